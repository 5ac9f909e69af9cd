"""The error contract: REST `{"error": {"code", "message"}, "request_id"}`; on the Open
Inference Protocol's `/v2/...` routes the protocol's `{"error": "<message>"}`. Same status
and headers (Retry-After, WWW-Authenticate) on both; the request id is in `x-request-id`."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """A request the platform refuses or cannot answer, other than bad input (`InputError`)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_response(status: int, code: str, message: str, request_id: str,
                   headers: dict[str, str] | None = None, oip: bool = False) -> JSONResponse:
    """oip: the request came on a `/v2/...` route (`is_oip_path`)."""
    body = {"error": message} if oip else {"error": {"code": code, "message": message}, "request_id": request_id}
    return JSONResponse(body, status_code=status, headers=headers or {})


def is_oip_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")
