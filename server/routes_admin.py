"""``GET /v1/models`` and ``/v1/models/{id}``, adapter load/unload (vLLM's bodies), ``/health``, ``/metrics``."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from trainserve.server.errors import APIError
from trainserve.server.models import LIVE_NAME
from trainserve.server.schemas import LoadLoraRequest, UnloadLoraRequest

from trainserve.adapters import AdapterError

router = APIRouter()


def _card(state: Any, model_id: str, created: int, **extra: Any) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "trainserve",
        "max_model_len": state.max_model_len,
        "permission": [],
        **extra,
    }


def _cards(state: Any) -> list[dict[str, Any]]:
    table = state.models
    base = table.base_name
    data = [_card(state, base, table.created, root=state.engine.spec.model_path, parent=None, version="base")]
    for entry in table.entries():
        data.append(
            _card(state, entry.name, entry.created, root=entry.shown_path, parent=base, version=entry.label)
        )
    live = table.live
    if live is not None:
        served = live.served_version
        data.append(
            _card(
                state,
                LIVE_NAME,
                table.created,
                root=None,
                parent=base,
                version=f"{LIVE_NAME}@v{served}" if served is not None else None,
            )
        )
    return data


@router.get("/v1/models")
async def list_models(request: Request) -> Any:
    return {"object": "list", "data": _cards(request.app.state.server)}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> Any:
    """OpenAI's retrieve; ids may hold slashes (hub ids, paths), hence the ``path`` converter."""
    state = request.app.state.server
    for card in _cards(state):
        if card["id"] == model_id:
            return card
    raise APIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraRequest, request: Request) -> Any:
    state = request.app.state.server
    config = state.config
    if config.adapters_dir is None and not config.allow_any_adapter_path:
        raise APIError(
            400,
            "loading adapters at runtime is disabled: start the server with --adapters-dir DIR "
            "(paths must lie inside it) or --allow-any-adapter-path",
            param="lora_path",
            code="adapter_loading_disabled",
        )
    try:
        entry, changed = await asyncio.to_thread(
            state.models.load,
            body.lora_name,
            body.lora_path,
            source="api",
            replace=body.load_inplace,
            confine_to=config.adapters_dir,
        )
    except AdapterError as exc:
        state.metrics.adapter_failures.labels("api").inc()
        raise APIError(400, str(exc), param="lora_path", code="invalid_adapter") from exc
    message = (
        f"Success: LoRA adapter '{entry.name}' added successfully."
        if changed
        else f"LoRA adapter '{entry.name}' is unchanged."
    )
    return {"message": message, "lora_name": entry.name, "version": entry.label}


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraRequest, request: Request) -> Any:
    state = request.app.state.server
    entry = await asyncio.to_thread(state.models.unload, body.lora_name)
    return {
        "message": f"Success: LoRA adapter '{entry.name}' removed successfully.",
        "lora_name": entry.name,
        "version": entry.label,
    }


@router.get("/health")
async def health(request: Request) -> Any:
    state = request.app.state.server
    if state.loop.fatal is not None:
        return JSONResponse({"status": "error", "error": repr(state.loop.fatal)}, status_code=503)
    body: dict[str, Any] = {
        "status": "draining" if state.draining else "ok",
        "adapters": {e.name: e.label for e in state.models.entries()},
    }
    body["adapter_versions_retiring"] = state.models.retiring
    if state.models.errors:
        body["adapter_errors"] = dict(state.models.errors)
    live = state.models.live
    if live is not None:
        body["live_version"] = live.served_version
    return body


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    m = request.app.state.server.metrics
    return Response(m.render(), media_type=m.content_type)
