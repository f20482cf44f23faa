"""OpenAI's request and response shapes: parsing what a client sends, building what it gets back.

Plain functions over dicts; no HTTP here. A bad value raises `ApiError`, which the routes turn
into OpenAI's error object with its status. Field names and nesting follow the OpenAI API
reference for chat completions, legacy completions and models, so its clients read ours.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

from vramancer.config.validation import MAX_SEED

MAX_STOP_STRINGS = 4  # what OpenAI accepts
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
ROLES = ("system", "developer", "user", "assistant", "tool")


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


@dataclass(frozen=True)
class CompletionRequest:
    """One chat or text completion request, checked, in the engine's terms."""

    model: str
    prompt: str | tuple  # text (completions, raw) or chat messages (the chat template applies)
    sampling: dict  # SamplingSettings fields
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    chat: bool = True
    id: str = field(default="")

    @property
    def raw(self) -> bool:
        return not self.chat


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


# --- parsing -------------------------------------------------------------------------------


def parse_chat(body: object) -> CompletionRequest:
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array of messages.", param="messages")
    prompt = tuple(_message(m, i) for i, m in enumerate(messages))
    most = _max_tokens(body, "max_completion_tokens")
    if most is None:
        most = _max_tokens(body, "max_tokens")
    return _request(body, prompt, most, chat=True)


def parse_completion(body: object) -> CompletionRequest:
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # OpenAI's clients may send a one-element batch
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (batches of prompts and token arrays are not served).",
                       param="prompt")
    if not prompt:
        raise ApiError(400, "'prompt' is empty; the model needs at least one token to continue.", param="prompt")
    return _request(body, prompt, _max_tokens(body, "max_tokens"), chat=False)


def _request(body: dict, prompt, max_tokens: int | None, chat: bool) -> CompletionRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "you must give 'model', the name of the loaded model (see GET /v1/models).",
                       param="model")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise ApiError(400, f"'n' must be 1 (one choice per request is served), not {n!r}.", param="n")
    sampling: dict = {}
    if max_tokens is not None:
        sampling["max_new_tokens"] = max_tokens
    temperature = _number(body, "temperature")
    if temperature is not None:
        if not 0 <= temperature <= MAX_TEMPERATURE:
            raise ApiError(400, f"'temperature' must be between 0 and 2, not {temperature:g}.", param="temperature")
        sampling["temperature"] = temperature
    top_p = _number(body, "top_p")
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ApiError(400, f"'top_p' must be more than 0 and at most 1, not {top_p:g}.", param="top_p")
        sampling["top_p"] = top_p
    top_k = body.get("top_k")  # not OpenAI's, but llama.cpp's and vLLM's servers take it
    if top_k is not None:
        if not _is_int(top_k) or top_k < 0:
            raise ApiError(400, f"'top_k' must be a whole number, 0 or more, not {top_k!r}.", param="top_k")
        sampling["top_k"] = top_k
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
            raise ApiError(400, f"'seed' must be a whole number between 0 and 2^64-1, not {seed!r}.", param="seed")
        sampling["seed"] = seed
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, not {stream!r}.", param="stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise ApiError(400, "'stream_options' is only allowed when 'stream' is true.", param="stream_options")
        if not isinstance(options, dict):
            raise ApiError(400, "'stream_options' must be an object.", param="stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise ApiError(400, "'stream_options.include_usage' must be true or false.",
                           param="stream_options.include_usage")
    return CompletionRequest(model, prompt, sampling, _stop(body.get("stop")), stream, include_usage, chat,
                             new_id(chat))


def _object(body: object) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    return body


def _message(message: object, index: int) -> dict:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ApiError(400, f"{param} must be an object with 'role' and 'content'.", param=param)
    role = message.get("role")
    if role not in ROLES:
        raise ApiError(400, f"{param}.role must be one of {', '.join(ROLES)}, not {role!r}.", param=f"{param}.role")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text is served
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{param}.content may hold only text parts ({{\"type\": \"text\", \"text\": ...}}).",
                               param=f"{param}.content")
            texts.append(part["text"])
        content = "".join(texts)
    if content is None and role == "assistant":
        content = ""  # an assistant turn that only called tools
    if not isinstance(content, str):
        raise ApiError(400, f"{param}.content must be a string or an array of text parts.", param=f"{param}.content")
    return {"role": "system" if role == "developer" else role, "content": content}


def _max_tokens(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise ApiError(400, f"'{name}' must be a whole number, 1 or more, not {value!r}.", param=name)
    return value


def _number(body: dict, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a number, not {value!r}.", param=name)
    return float(value)


def _stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a non-empty string or an array of non-empty strings.", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' may hold at most {MAX_STOP_STRINGS} strings, not {len(stops)}.", param="stop")
    return tuple(stops)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- responses -------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request: CompletionRequest, model: str, created: int, text: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int) -> dict:
    """The whole answer of a non-streamed request."""
    if request.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                  "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {"id": request.id, "object": "chat.completion" if request.chat else "text_completion",
            "created": created, "model": model, "system_fingerprint": None, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(request: CompletionRequest, model: str, created: int, text: str | None = None,
               finish_reason: str | None = None, first: bool = False, usage_: dict | None = None,
               no_choice: bool = False) -> dict:
    """One streamed chunk. The chat stream's first chunk carries the role; with
    `include_usage` every chunk has "usage": null and a last one, without choices, has it."""
    if no_choice:
        choices = []
    elif request.chat:
        delta: dict = {"role": "assistant", "content": ""} if first else {}
        if text is not None:
            delta["content"] = text
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
    body = {"id": request.id, "object": "chat.completion.chunk" if request.chat else "text_completion",
            "created": created, "model": model, "system_fingerprint": None, "choices": choices}
    if request.include_usage:
        body["usage"] = usage_
    return body


def models_body(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "vramancer"}]}


def now() -> int:
    return int(time.time())
