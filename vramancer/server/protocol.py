"""OpenAI's request and response shapes: parsing what a client sends, building what it gets back.

Plain functions over dicts; no HTTP here. A bad value raises `ApiError`, which the routes turn
into OpenAI's error object with its status. Field names and nesting follow the OpenAI API
reference for chat completions, legacy completions and models, so its clients read ours.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field, replace

from vramancer.config.validation import MAX_SEED
from vramancer.server.errors import MAX_SCHEMA_DEPTH, ApiError, depth
from vramancer.server.tools import parse_tools

MAX_STOP_STRINGS = 4  # what OpenAI accepts
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat; its completions take at most 5
MAX_COMPLETION_LOGPROBS = 5
MAX_LOGIT_BIAS = 1024  # entries; each is one addition per step, so keep the work bounded
ROLES = ("system", "developer", "user", "assistant", "tool")

# Every field a request may carry; anything else is refused by name, so that no field a
# client relies on is silently ignored. `user` only labels the request in the dashboard.
SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stream",
                   "stream_options", "n", "logprobs", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "logit_bias", "user"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                                 "tool_choice", "parallel_tool_calls"}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "echo"}
MESSAGE_FIELDS = {"role", "content", "tool_calls", "tool_call_id"}
# OpenAI fields this server does not serve -> what they are, for the refusal. They pass only
# when they ask for what the server does anyway (NO_OP).
NOT_SERVED = {
    "functions": "function calling", "function_call": "function calling",
    "echo": "echoing the prompt (completions only)", "suffix": "text after the insertion point", "best_of": "best-of sampling",
    "audio": "audio output", "modalities": "other outputs than text", "prediction": "predicted outputs",
    "web_search_options": "web search", "store": "stored answers", "metadata": "stored answers",
    "service_tier": "service tiers", "reasoning_effort": "reasoning settings", "verbosity": "verbosity settings",
    "prompt_cache_key": "prompt cache keys", "safety_identifier": "safety identifiers",
    "name": "participant names",
    "function_call_id": "function calling",
}
NO_OP = {"echo": (False,),
         "suffix": ("",), "best_of": (1,), "modalities": (["text"],), "store": (False,), "refusal": (None,),
         }


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
    logprobs: int | None = None  # alternatives per token (0: the chosen token's alone); None: none asked
    user: str = ""
    json_schema: str | None = None  # response_format: the schema the answer must follow, as JSON text
    tools: object = None  # tools.ToolRequest when tools may be called
    echo: bool = False  # completions: the answer's text (and logprobs) begin with the prompt's

    @property
    def raw(self) -> bool:
        return not self.chat


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


# --- parsing -------------------------------------------------------------------------------


def parse_chat(body: object) -> CompletionRequest:
    body = as_object(body)
    only_fields(body, CHAT_FIELDS, "")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array of messages.", param="messages")
    prompt = tuple(_message(m, i) for i, m in enumerate(messages))
    most = _max_tokens(body, "max_completion_tokens")
    if most is None:
        most = _max_tokens(body, "max_tokens")
    request = _request(body, prompt, most, chat=True)
    tools = parse_tools(body)
    if tools is not None and request.json_schema is not None and tools.mode != "auto":
        raise ApiError(400, "'response_format' and a required 'tool_choice' ask for two formats at once.",
                       param="response_format")
    return replace(request, tools=tools)


def parse_completion(body: object) -> CompletionRequest:
    body = as_object(body)
    only_fields(body, COMPLETION_FIELDS, "")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # OpenAI's clients may send a one-element batch
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (batches of prompts and token arrays are not served).",
                       param="prompt")
    if not prompt:
        raise ApiError(400, "'prompt' is empty; the model needs at least one token to continue.", param="prompt")
    echo = body.get("echo", False)
    if echo is None:
        echo = False
    if not isinstance(echo, bool):
        raise ApiError(400, f"'echo' must be true or false, not {echo!r}.", param="echo")
    max_tokens = _max_tokens(body, "max_tokens", least=0 if echo else 1)
    return replace(_request(body, prompt, max_tokens, chat=False), echo=echo)


def _request(body: dict, prompt, max_tokens: int | None, chat: bool) -> CompletionRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "you must give 'model', the name of the loaded model (see GET /v1/models).",
                       param="model")
    n = body.get("n")
    if n is not None and (not is_int(n) or n != 1):
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
        if not is_int(top_k) or top_k < 0:
            raise ApiError(400, f"'top_k' must be a whole number, 0 or more, not {top_k!r}.", param="top_k")
        sampling["top_k"] = top_k
    seed = body.get("seed")
    if seed is not None:
        if not is_int(seed) or not 0 <= seed <= MAX_SEED:
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
    _adjustments(body, sampling)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(400, f"'user' must be a string, not {user!r}.", param="user")
    return CompletionRequest(model, prompt, sampling, _stop(body.get("stop")), stream, include_usage, chat,
                             new_id(chat), _logprobs(body, chat), (user or "")[:64], _response_format(body))


def _response_format(body: dict) -> str | None:
    """OpenAI's response_format as a JSON schema (text), or None for plain text: json_object is
    any JSON object; json_schema's `schema` is followed whether `strict` is set or not."""
    value = body.get("response_format")
    if value is None:
        return None
    wanted = value.get("type") if isinstance(value, dict) else None
    if wanted == "text":
        return None
    if wanted == "json_object":
        return json.dumps({"type": "object"})
    if wanted != "json_schema":
        raise ApiError(400, f"'response_format.type' must be text, json_object or json_schema, not {wanted!r}.",
                       param="response_format")
    spec = value.get("json_schema")
    schema = spec.get("schema", {}) if isinstance(spec, dict) else None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(schema, dict):
        raise ApiError(400, "'response_format.json_schema' must be an object with a 'name' and a 'schema' object.",
                       param="response_format.json_schema")
    if depth(schema) > MAX_SCHEMA_DEPTH:
        raise ApiError(400, f"'response_format.json_schema.schema' nests deeper than {MAX_SCHEMA_DEPTH} levels.",
                       param="response_format.json_schema.schema")
    return json.dumps(schema)


def only_fields(fields: dict, allowed: set[str], where: str) -> None:
    """Refuse, by name, the first field that is neither served nor a no-op (a null is absent)."""
    for name, value in fields.items():
        if name in allowed or value is None or value in NO_OP.get(name, ()):
            continue
        param = f"{where}.{name}" if where else name
        what = NOT_SERVED.get(name)
        if what is not None:
            raise ApiError(400, f"'{param}' asks for {what}, which this server does not serve; leave it out.",
                           param=param, code="unsupported_parameter")
        raise ApiError(400, f"'{param}' is not a field this server knows; it refuses what it would otherwise "
                            f"ignore.", param=param, code="unknown_parameter")


def _adjustments(body: dict, sampling: dict) -> None:
    """The penalties, min_p and logit_bias, checked as OpenAI (and vLLM, for the rest) range them."""
    for name in ("presence_penalty", "frequency_penalty"):
        value = _number(body, name)
        if value is not None:
            if not -2 <= value <= 2:
                raise ApiError(400, f"'{name}' must be between -2 and 2, not {value:g}.", param=name)
            sampling[name] = value
    repetition = _number(body, "repetition_penalty")
    if repetition is not None:
        if not 0 < repetition <= 10:
            raise ApiError(400, f"'repetition_penalty' must be more than 0 and at most 10, not {repetition:g}.",
                           param="repetition_penalty")
        sampling["repetition_penalty"] = repetition
    min_p = _number(body, "min_p")
    if min_p is not None:
        if not 0 <= min_p <= 1:
            raise ApiError(400, f"'min_p' must be between 0 and 1, not {min_p:g}.", param="min_p")
        sampling["min_p"] = min_p
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
            raise ApiError(400, f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} token ids and "
                                "biases.", param="logit_bias")
        checked: dict[int, float] = {}
        for key, value in bias.items():
            if not key.isdigit() or len(key) > 9:
                raise ApiError(400, f"'logit_bias' keys must be token ids, not {key!r}.", param="logit_bias")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
                raise ApiError(400, f"the logit_bias of token {key} must be a number between -100 and 100, "
                                    f"not {value!r}.", param="logit_bias")
            checked[int(key)] = float(value)
        if checked:
            sampling["logit_bias"] = checked


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives per token to report, or None. Chat: `logprobs` true/false and
    `top_logprobs` 0-20; completions: `logprobs` 0-5 (the alternatives' count itself)."""
    wanted = body.get("logprobs")
    if chat:
        if wanted is not None and not isinstance(wanted, bool):
            raise ApiError(400, f"'logprobs' must be true or false, not {wanted!r}.", param="logprobs")
        top = body.get("top_logprobs")
        if top is not None:
            if not is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS:
                raise ApiError(400, f"'top_logprobs' must be a whole number from 0 to {MAX_TOP_LOGPROBS}, "
                                    f"not {top!r}.", param="top_logprobs")
            if not wanted:
                raise ApiError(400, "'top_logprobs' needs 'logprobs' to be true.", param="top_logprobs")
        return (top or 0) if wanted else None
    if wanted is None:
        return None
    if not is_int(wanted) or not 0 <= wanted <= MAX_COMPLETION_LOGPROBS:
        raise ApiError(400, f"'logprobs' must be a whole number from 0 to {MAX_COMPLETION_LOGPROBS}, not {wanted!r}.",
                       param="logprobs")
    return wanted


def as_object(body: object) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    return body


def _message(message: object, index: int) -> dict:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ApiError(400, f"{param} must be an object with 'role' and 'content'.", param=param)
    only_fields(message, MESSAGE_FIELDS, param)
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
    out = {"role": "system" if role == "developer" else role, "content": content}
    calls = message.get("tool_calls")
    if calls:
        if role != "assistant" or not isinstance(calls, list):
            raise ApiError(400, f"{param}.tool_calls belongs to assistant messages, as an array.",
                           param=f"{param}.tool_calls")
        for j, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            try:
                arguments = json.loads(function["arguments"])
                ok = isinstance(function["name"], str) and isinstance(arguments, dict)
            except (TypeError, KeyError, ValueError):
                ok = False
            if not ok:
                raise ApiError(400, f"{param}.tool_calls[{j}] must have a function with a name and its arguments "
                                    f"as a JSON object in text.", param=f"{param}.tool_calls[{j}]")
        out["tool_calls"] = [{"id": c.get("id"), "type": "function", "function": {
            "name": c["function"]["name"], "arguments": c["function"]["arguments"]}} for c in calls]
    call_id = message.get("tool_call_id")
    if call_id is not None:
        if role != "tool" or not isinstance(call_id, str):
            raise ApiError(400, f"{param}.tool_call_id belongs to tool messages, as a string.",
                           param=f"{param}.tool_call_id")
        out["tool_call_id"] = call_id
    return out


def _max_tokens(body: dict, name: str, least: int = 1) -> int | None:
    """`least` is 0 where nothing new may be asked for: an echoed prompt, scored alone."""
    value = body.get(name)
    if value is None:
        return None
    if not is_int(value) or value < least:
        raise ApiError(400, f"'{name}' must be a whole number, {least} or more, not {value!r}.", param=name)
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


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- responses -------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprobs_body(request: CompletionRequest, entries, offset: int = 0) -> dict | None:
    """`entries` (the engine's TokenLogprob, in order) in the shape of the request's endpoint:
    chat's `content` list, or completions' parallel lists (`text_offset` counted from `offset`,
    the characters of the answer before these tokens). None when logprobs were not asked for."""
    if request.logprobs is None:
        return None
    if request.chat:
        def one(token: str, logprob: float) -> dict:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if e.logprob is None else dict(e.top) for e in entries], "text_offset": offsets}


def completion_body(request: CompletionRequest, model: str, created: int, text: str | None, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int, logprobs=(), tool_calls: list | None = None) -> dict:
    """The whole answer of a non-streamed request (`logprobs`: every answer token's)."""
    if request.chat:
        message = {"role": "assistant", "content": text, "refusal": None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        choice = {"index": 0, "message": message,
                  "logprobs": logprobs_body(request, logprobs), "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": logprobs_body(request, logprobs),
                  "finish_reason": finish_reason}
    return {"id": request.id, "object": "chat.completion" if request.chat else "text_completion",
            "created": created, "model": model, "system_fingerprint": None, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(request: CompletionRequest, model: str, created: int, text: str | None = None,
               finish_reason: str | None = None, first: bool = False, usage_: dict | None = None,
               no_choice: bool = False, logprobs: dict | None = None, tool_calls: list | None = None) -> dict:
    """One streamed chunk. The chat stream's first chunk carries the role; with
    `include_usage` every chunk has "usage": null and a last one, without choices, has it."""
    if no_choice:
        choices = []
    elif request.chat:
        delta: dict = {"role": "assistant", "content": ""} if first else {}
        if text is not None:
            delta["content"] = text
        if tool_calls:  # deltas, each with the index of the call it continues
            delta["tool_calls"] = tool_calls
        choices = [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}]
    body = {"id": request.id, "object": "chat.completion.chunk" if request.chat else "text_completion",
            "created": created, "model": model, "system_fingerprint": None, "choices": choices}
    if request.include_usage:
        body["usage"] = usage_
    return body


def model_body(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "vramancer"}


def models_body(model: str, created: int) -> dict:
    return {"object": "list", "data": [model_body(model, created)]}


def now() -> int:
    return int(time.time())
