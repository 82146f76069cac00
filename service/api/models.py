"""GET /v1/models, GET /v1/models/{id}, DELETE /v1/models/{id}: the model store, through the engine."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Depends, HTTPException, Path

from service.api.deps import get_engine, require_api_key
from service.api.http import error_responses
from service.engine import DeleteRefused, Engine, ModelRecord, UnknownModel
from service.schemas import ModelInfo

router = APIRouter(
    prefix="/v1/models", tags=["models"], dependencies=[Depends(require_api_key)], responses=error_responses(401)
)


def model_info(record: ModelRecord, engine: Engine) -> ModelInfo:
    """The wire form: everything but where the files are, and the engine's speed warning."""
    fields = asdict(record)
    del fields["path"]
    return ModelInfo(**fields, speed_warning=engine.speed_warning(record.id))


@router.get("", response_model=list[ModelInfo])
def list_models(engine: Engine = Depends(get_engine)) -> list[ModelInfo]:
    return [model_info(r, engine) for r in engine.models()]


@router.get("/{model_id}", response_model=ModelInfo, responses=error_responses(404))
def get_model(model_id: str = Path(..., max_length=128), engine: Engine = Depends(get_engine)) -> ModelInfo:
    try:
        return model_info(engine.model(model_id), engine)
    except UnknownModel as e:
        raise HTTPException(404, str(e)) from e


@router.delete("/{model_id}", status_code=204, responses=error_responses(404, 409))
def delete_model(model_id: str = Path(..., max_length=128), engine: Engine = Depends(get_engine)) -> None:
    """Remove a quantized model that no session is using."""
    try:
        engine.delete_model(model_id)
    except UnknownModel as e:
        raise HTTPException(404, str(e)) from e
    except DeleteRefused as e:
        raise HTTPException(409, str(e)) from e
