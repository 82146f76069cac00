"""Evaluation and benchmarking of world models."""
