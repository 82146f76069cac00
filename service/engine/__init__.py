"""The engine: loaded models and live sessions, stepped in batches off the event loop."""

from service.engine.engine import AtCapacity, Engine, Session
from service.engine.registry import ModelInUse, ModelRegistry, UnknownModel

__all__ = ["AtCapacity", "Engine", "ModelInUse", "ModelRegistry", "Session", "UnknownModel"]
