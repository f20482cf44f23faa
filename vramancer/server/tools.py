"""Tool calling, the request's side: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`
checked, and earlier calls given to the chat template as templates take them. The calls the model
writes are read back by tool_calls.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from vramancer.server.errors import MAX_SCHEMA_DEPTH, ApiError, depth

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
