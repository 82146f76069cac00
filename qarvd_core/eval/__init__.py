"""Evaluation and benchmarking of world models (DESIGN §6)."""
