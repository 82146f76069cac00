"""Thin routers over the engine client (sessions, renders, models) and the job client."""
