"""The engine client: sessions, video renders and models, as the routes see them."""

from service.engine.engine import AtCapacity, Engine, NotForModel, Session
from service.store import DeleteRefused, ModelRecord, UnknownModel

__all__ = ["AtCapacity", "DeleteRefused", "Engine", "ModelRecord", "NotForModel", "Session", "UnknownModel"]
