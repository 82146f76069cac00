"""Thin routers over the engine and registry."""
