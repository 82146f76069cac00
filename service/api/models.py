"""GET /v1/models, GET /v1/models/{id}: the registry, read side."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Path

from service.api.deps import get_engine, require_api_key
from service.api.http import error_responses
from service.engine import Engine, ModelInUse, UnknownModel
from service.schemas import ModelInfo

router = APIRouter(
    prefix="/v1/models", tags=["models"], dependencies=[Depends(require_api_key)], responses=error_responses(401)
)


@router.get("", response_model=list[ModelInfo])
def list_models(engine: Engine = Depends(get_engine)) -> list[ModelInfo]:
    return [engine.registry.info(i) for i in engine.registry.ids()]


@router.get("/{model_id}", response_model=ModelInfo, responses=error_responses(404))
def get_model(model_id: str = Path(..., max_length=128), engine: Engine = Depends(get_engine)) -> ModelInfo:
    try:
        return engine.registry.info(model_id)
    except UnknownModel as e:
        raise HTTPException(404, str(e)) from e


@router.delete("/{model_id}", status_code=204, responses=error_responses(404, 409))
def delete_model(model_id: str = Path(..., max_length=128), engine: Engine = Depends(get_engine)) -> None:
    """Remove a quantized model that no session is using."""
    try:
        engine.registry.delete(model_id)
    except UnknownModel as e:
        raise HTTPException(404, str(e)) from e
    except ModelInUse as e:
        raise HTTPException(409, str(e)) from e
