"""API errors and their two JSON shapes (OpenAI's and Anthropic's).

Every failure a client can cause is raised as ApiError with a 4xx status and a message that names
the field; the route's dialect decides which JSON shape the client gets back, so each SDK shows
the message to its user instead of a parse failure.
"""

from __future__ import annotations

# HTTP status -> Anthropic's error "type" (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}

# HTTP status -> OpenAI's error "type".
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class ApiError(Exception):
    """A request the server refuses; `status` is the HTTP status, `param` the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def openai_body(err: ApiError) -> dict:
    return {
        "error": {
            "message": err.message,
            "type": _OPENAI_TYPES.get(err.status, "invalid_request_error"),
            "param": err.param,
            "code": err.code,
        }
    }


def anthropic_body(err: ApiError) -> dict:
    return {
        "type": "error",
        "error": {"type": _ANTHROPIC_TYPES.get(err.status, "invalid_request_error"), "message": err.message},
    }


def error_body(err: ApiError, dialect: str) -> dict:
    """dialect: 'anthropic' for /v1/messages, 'openai' for everything else."""
    return anthropic_body(err) if dialect == "anthropic" else openai_body(err)


def dialect_of(path: str) -> str:
    return "anthropic" if path.startswith("/v1/messages") else "openai"
