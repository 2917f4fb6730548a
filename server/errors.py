"""Errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import sys
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
}


def _safe(text: str | None) -> str | None:
    """``text`` made encodable as UTF-8: a lone surrogate copied from the request into a message
    would otherwise make the error response itself fail (a plain-text 500)."""
    if text is None:
        return None
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


class APIError(Exception):
    """An error answered to the client as ``status`` with an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _TYPES.get(status, "server_error")


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None, type_: str | None = None
) -> dict[str, Any]:
    """The JSON body of an error response."""
    return {
        "error": {
            "message": _safe(message),
            "type": type_ or _TYPES.get(status, "server_error"),
            "param": _safe(param),
            "code": code,
        }
    }


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def engine_failure(constraint: str | None) -> APIError:
    """The error for a request the engine finished with ``finish_reason="error"`` (not an OpenAI value).
    vLLM does that when a structured-output constraint that passed its checks then fails to compile
    (an empty grammar, a schema that rejects every token): the client's constraint, a 400 naming it;
    with no constraint, the engine's own failure, a 500."""
    if constraint is not None:
        return bad_request(f"{constraint}: the engine could not use this structured-output constraint (it did not "
                           "compile, or allows no token); check it", param=constraint)
    return APIError(500, "the engine failed this request", code="engine_error")


def client_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that vLLM raises for a bad request (``VLLMValidationError`` is not a ValueError
    in every release)."""
    types: list[type[BaseException]] = [ValueError, TypeError]
    try:
        from vllm.exceptions import VLLMClientError

        types.append(VLLMClientError)
    except ImportError:
        pass
    return tuple(types)


MAX_ENGINE_MESSAGE = 2000  # characters of a vLLM error message that are answered


def from_engine_error(exc: BaseException) -> APIError:
    """A 400 for an exception that vLLM raised while checking a request. vLLM's message repeats the
    whole offending value (``value=[512, 513, ...]`` for 100k out-of-vocabulary ``logit_bias`` ids:
    a 1.4 MB error body), so a long one is cut."""
    message = str(exc)
    if len(message) > MAX_ENGINE_MESSAGE:
        message = message[:MAX_ENGINE_MESSAGE] + f"... ({len(message) - MAX_ENGINE_MESSAGE} more characters)"
    return bad_request(message, param=getattr(exc, "parameter", None))


_NOT_JSON = "We could not parse the JSON body of your request"  # OpenAI's words
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _param_of(loc: Any) -> str | None:
    """``("body", "messages", 0, "role")`` → ``"messages.0.role"``, without pydantic's union-member tags."""
    parts = []
    for part in loc:
        if part == "body" and not parts:
            continue
        if isinstance(part, int) or (
            isinstance(part, str) and part.isidentifier() and part.lower() not in _TYPE_TAGS
        ):
            parts.append(str(part))
    return ".".join(parts) or None


def install_handlers(app: FastAPI) -> None:
    """Answer every error (ours, FastAPI's validation 422, Starlette's 404/405) in the OpenAI shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.status, exc.message, exc.param, exc.code, exc.type), status_code=exc.status
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        param = _param_of(first.get("loc", ()))
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more)"
        kind = str(first.get("type", ""))
        if kind == "json_invalid":  # FastAPI's loc is ("body", <character offset>): not a field
            where = first.get("loc", ())[-1:]
            at = f" at character {where[0]}" if where and isinstance(where[0], int) else ""
            return error_response(400, f"{_NOT_JSON} ({(first.get('ctx') or {}).get('error', 'invalid JSON')}{at})",
                                  code="invalid_json")
        if kind == "missing" and tuple(first.get("loc", ())) == ("body",):  # no body at all
            return error_response(400, "The request body is empty: send a JSON object as Content-Type: "
                                  "application/json", code="invalid_json")
        if kind == "model_attributes_type" and tuple(first.get("loc", ())) == ("body",):
            # a JSON array or string, or a body FastAPI did not parse (curl -d: form-encoded)
            sent = (request.headers.get("content-type") or "none")[:100]
            return error_response(
                400, f"The request body must be a JSON object sent as Content-Type: application/json (got {sent})",
                code="invalid_json",
            )
        code = "invalid_type" if kind.endswith(("_type", "_parsing", "json_invalid")) else "invalid_value"
        if kind == "extra_forbidden":  # OpenAI's wording for a field it does not know
            message, code = f"Unrecognized request argument supplied: {param}", "unknown_parameter"
        return error_response(400, message, param=param, code=code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's answer to a body json.loads cannot take (not UTF-8, nested too deeply)
            return error_response(400, f"{_NOT_JSON} (not UTF-8, nested too deeply, or a number of more than "
                                  f"{sys.get_int_max_str_digits() or 'the allowed'} digits)", code="invalid_json")
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))
