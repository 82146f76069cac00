"""The qarvd service: FastAPI app for streaming sessions, videos, models and metrics."""
