"""The error a client is told about, as OpenAI words them, and the limit on how deeply a body
may nest (checked without recursion, so a nesting bomb is a 400, not a RecursionError)."""

from __future__ import annotations

MAX_SCHEMA_DEPTH = 32  # nesting of a response_format schema; real ones stay far below


class ApiError(Exception):
    """An error a client is told about, as OpenAI words them: {"error": {...}} with a status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def depth(value: object) -> int:
    """How deeply arrays and objects nest in `value`, counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                deepest = max(deepest, depth + 1)
                stack.append((child, depth + 1))
    return deepest
