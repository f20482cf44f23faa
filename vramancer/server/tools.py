"""Tool calling: OpenAI's `tools` and `tool_choice` through the model's own chat template, and
the model's tool calls read back out of its text into `tool_calls`.

A chat template decides how tools are shown to the model and how it is taught to call them;
the server reads calls in the format of the Hermes / Qwen templates, the common one among open
models: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call. A
template that takes tools but teaches another format is refused (400) rather than read wrong.
`tool_choice` "required" or a named function holds the answer to that format with a grammar
(scheduling/constrained.py: the calls' JSON follows each function's parameter schema); "auto" lets
the model choose and reads whatever calls it writes; "none" shows it no tools.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from vramancer.server.errors import MAX_SCHEMA_DEPTH, ApiError, depth

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)
MAX_TOOLS = 128


@dataclass(frozen=True)
class ToolRequest:
    tools: tuple[dict, ...]  # as the template takes them: {"type": "function", "function": {...}}
    mode: str  # auto | required | named
    name: str | None = None  # the function a named tool_choice asks for
    parallel: bool = True


def parse_tools(body: dict) -> ToolRequest | None:
    """`tools`, `tool_choice` and `parallel_tool_calls`, checked; None when no tool may be called."""
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ApiError(400, f"'parallel_tool_calls' must be true or false, not {parallel!r}.",
                       param="parallel_tool_calls")
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ApiError(400, f"'tools' must be an array of at most {MAX_TOOLS} tools.", param="tools")
    names = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ApiError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}} with a "
                                f"name of letters, digits, '_', '.' or '-'.", param=f"tools[{i}]")
        parameters = function.get("parameters", {"type": "object"})
        if not isinstance(parameters, dict) or depth(parameters) > MAX_SCHEMA_DEPTH:
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON schema object nested at most "
                                f"{MAX_SCHEMA_DEPTH} levels.", param=f"tools[{i}].function.parameters")
        names.append(name)
    if choice is None:
        choice = "auto" if tools else "none"
    if isinstance(choice, dict):
        named = choice.get("function", {}).get("name") if choice.get("type") == "function" else None
        if not isinstance(named, str) or named not in names:
            raise ApiError(400, f"'tool_choice' names a function that is not among 'tools': {named!r}.",
                           param="tool_choice")
        mode, name = "named", named
    elif choice in ("auto", "required", "none"):
        mode, name = choice, None
    else:
        raise ApiError(400, f"'tool_choice' must be none, auto, required or a named function, not {choice!r}.",
                       param="tool_choice")
    if mode == "none":
        return None
    if not tools:
        raise ApiError(400, f"'tool_choice' {choice!r} needs 'tools'.", param="tool_choice")
    return ToolRequest(tuple(tools), mode, name, parallel is not False)


def check_template(template: str | None) -> None:
    """Refuse tools for a template that takes none, or teaches calls in a format not read here."""
    if not template or "tools" not in template:
        raise ApiError(400, "this model's chat template takes no tools, so tool calling cannot be served for it.",
                       param="tools", code="tools_not_supported")
    if OPEN not in template:
        raise ApiError(400, f"this model's chat template writes tool calls in a format this server does not read "
                            f"(it reads {OPEN} blocks).", param="tools", code="tools_not_supported")


def grammar(request: ToolRequest) -> str | None:
    """The Lark grammar (llguidance's, with %json schemas) that holds a required or named
    answer to tool calls; None for auto."""
    if request.mode == "auto":
        return None
    functions = [t["function"] for t in request.tools if request.mode == "required"
                 or t["function"]["name"] == request.name]
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": f["name"]},
                             "arguments": f.get("parameters") or {"type": "object"}}} for f in functions]
    schema = {"anyOf": calls, "x-guidance": {"whitespace_flexible": False}}
    repeat = ' ("\\n" call)*' if request.parallel else ""
    return f'start: call{repeat}\ncall: "{OPEN}\\n" %json {json.dumps(schema)} "\\n{CLOSE}"\n'


def read_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) from an answer's text: the text before the first call, and each
    call that parses as {"name", "arguments"}. When a block does not parse, nothing is read as
    a call and the whole text is the content."""
    start = text.find(OPEN)
    if start < 0:
        return text, []
    calls = []
    for block in _CALL.findall(text[start:]):
        try:
            call = json.loads(block)
        except ValueError:
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        arguments = call.get("arguments", call.get("parameters", {}))
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}})
    content = text[:start]
    return (content if content.strip() else None), calls


def held_back(text: str) -> int:
    """How much of the end of `text` could be the start of a tool call, not to stream yet."""
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:k]):
            return k
    return 0


def template_messages(messages: list[dict]) -> list[dict]:
    """Assistant tool calls as templates take them: arguments as objects, not JSON text."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            message = {**message, "tool_calls": [
                {"type": "function", "id": c.get("id"), "function": {"name": c["function"]["name"],
                                                                     "arguments": json.loads(c["function"]["arguments"])}}
                for c in calls]}
        out.append(message)
    return out
