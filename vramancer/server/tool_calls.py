"""The calls a model writes, read back into OpenAI's `tool_calls`, whole or as streamed deltas.

A chat template decides how the model is taught to call tools. The server reads the formats open
models' templates teach (`FORMATS`): Hermes / Qwen `<tool_call>{...}</tool_call>` blocks,
Mistral's `[TOOL_CALLS][{...}]`, the `<|tool_call|>[...]` of Phi-4 and Granite, and Llama 3's
`{"name": ..., "parameters": {...}}`. A template that takes tools but teaches none of these is
refused (400) rather than read wrong. Markers that are special tokens may be dropped when the
answer is decoded, so the formats whose calls are plain JSON also read an answer that *is* that
JSON. `tool_choice` "required" or a named function holds the answer to the format with a grammar
(scheduling/constrained.py: each call's JSON follows its function's parameter schema).

Streamed, a call goes out as OpenAI's deltas: its id and name once the name is written, then its
arguments piece by piece as the model writes them (`CallStream`). The arguments are the model's
own JSON text, so a streamed call and the same call answered whole carry the same string.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from vramancer.server.errors import ApiError

ARGUMENT_KEYS = ("arguments", "parameters")  # what the formats call a call's arguments
_SPACE = re.compile(r"\s*")
_LITERAL = re.compile(r"[^,}\]\s]*")  # a number, true, false or null


@dataclass(frozen=True)
class CallFormat:
    name: str
    marker: str  # written before the calls
    close: str = ""  # written after each call (or each array of calls), if the format has one
    bare: bool = False  # an answer that is the calls' JSON alone counts (the marker may be a special token)
    array: bool = False  # the grammar writes the calls as one JSON array
    arguments_key: str = "arguments"  # the key the grammar writes the arguments under

    def grammar_for(self, calls: list[dict], parallel: bool) -> str:
        """A Lark grammar (llguidance's, `%json` for schemas) that writes calls in this format."""
        schema = json.dumps({"anyOf": calls, "x-guidance": {"whitespace_flexible": False}})
        if self.array:
            repeat = ' ("," call)*' if parallel else ""
            return f'start: "[" call{repeat} "]"\ncall: %json {schema}\n'
        if self.bare:  # one call: a bare object is read alone
            return f"start: %json {schema}\n"
        repeat = ' ("\\n" call)*' if parallel else ""
        return f'start: call{repeat}\ncall: "{self.marker}\\n" %json {schema} "\\n{self.close}"\n'


HERMES = CallFormat("hermes", "<tool_call>", "</tool_call>")
FORMATS = (
    HERMES,
    CallFormat("mistral", "[TOOL_CALLS]", bare=True, array=True),
    CallFormat("phi-granite", "<|tool_call|>", "<|/tool_call|>", bare=True, array=True),
    CallFormat("llama3", "<|python_tag|>", bare=True, arguments_key="parameters"),
)
# What in a template says it teaches Llama 3's JSON calls (its marker is only for built-in tools).
_LLAMA3_HINT = re.compile(r'"parameters":\s*dictionary of argument name')


def format_of(template: str | None) -> CallFormat:
    """The call format a chat template teaches; a 400 for one that takes no tools or teaches
    a format not read here."""
    if not template or "tools" not in template:
        raise ApiError(400, "this model's chat template takes no tools, so tool calling cannot be served for it.",
                       param="tools", code="tools_not_supported")
    for fmt in FORMATS:
        if fmt.marker in template or (fmt.name == "llama3" and _LLAMA3_HINT.search(template)):
            return fmt
    names = ", ".join(f.marker for f in FORMATS)
    raise ApiError(400, f"this model's chat template writes tool calls in a format this server does not read "
                        f"(it reads {names}).", param="tools", code="tools_not_supported")


def grammar(request, fmt: CallFormat = HERMES) -> str | None:
    """The grammar that holds a required or named answer (`request`: a tools.ToolRequest) to
    tool calls in `fmt`; None for auto."""
    if request.mode == "auto":
        return None
    functions = [t["function"] for t in request.tools if request.mode == "required"
                 or t["function"]["name"] == request.name]
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", fmt.arguments_key],
              "properties": {"name": {"const": f["name"]},
                             fmt.arguments_key: f.get("parameters") or {"type": "object"}}} for f in functions]
    return fmt.grammar_for(calls, request.parallel)


# --- reading ------------------------------------------------------------------------------------

@dataclass
class PartCall:
    """A call as far as it is written: its name once whole, its arguments' text so far."""
    name: str | None = None
    arguments: str = ""
    done: bool = False  # its object closed


@dataclass
class Scan:
    start: int | None = None  # where the calls begin (None: the text holds none)
    calls: list[PartCall] = field(default_factory=list)
    broken: bool = False  # something after `start` is not a call in this format


def _value_end(text: str, i: int) -> int | None:
    """Where the JSON value that starts at text[i] ends, or None while it is still being written."""
    if text[i] not in '{["':
        end = _LITERAL.match(text, i).end()
        return end if end < len(text) else None
    depth, quoted, escaped = 0, False, False
    for j in range(i, len(text)):
        c = text[j]
        if quoted:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                quoted = False
                if depth == 0:
                    return j + 1
        elif c == '"':
            quoted = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
    return None


def _read_call(text: str, i: int, call: PartCall) -> int | None:
    """Read the call object at text[i] ('{') into `call`; the index after it, None while it is
    unfinished. Raises ValueError where the text is not such an object."""
    i = _SPACE.match(text, i + 1).end()
    if i < len(text) and text[i] == "}":
        call.done = True
        return i + 1
    while i < len(text):
        if text[i] != '"':
            raise ValueError("a call's keys are strings")
        end = _value_end(text, i)
        if end is None:
            return None
        key = json.loads(text[i:end])
        i = _SPACE.match(text, end).end()
        if i >= len(text):
            return None
        if text[i] != ":":
            raise ValueError("a key is followed by ':'")
        i = _SPACE.match(text, i + 1).end()
        if i >= len(text):
            return None
        end = _value_end(text, i)
        if key in ARGUMENT_KEYS:
            call.arguments = text[i:end]  # the text so far while unfinished
        if end is None:
            return None
        if key == "name":
            call.name = json.loads(text[i:end])
        i = _SPACE.match(text, end).end()
        if i >= len(text):
            return None
        if text[i] == "}":
            call.done = True
            return i + 1
        if text[i] != ",":
            raise ValueError("members are separated by ','")
        i = _SPACE.match(text, i + 1).end()
    return None


def _read_calls_at(text: str, i: int, scan: Scan) -> int | None:
    """Read one call or an array of calls at text[i]; the index after, None while unfinished."""
    if text[i] == "{":
        scan.calls.append(PartCall())
        return _read_call(text, i, scan.calls[-1])
    if text[i] != "[":
        raise ValueError("calls are an object or an array of objects")
    i = _SPACE.match(text, i + 1).end()
    while i < len(text):
        if text[i] != "{":
            raise ValueError("an array of calls holds objects")
        scan.calls.append(PartCall())
        i = _read_call(text, i, scan.calls[-1])
        if i is None:
            return None
        i = _SPACE.match(text, i).end()
        if i >= len(text):
            return None
        if text[i] == "]":
            return i + 1
        if text[i] != ",":
            raise ValueError("calls in an array are separated by ','")
        i = _SPACE.match(text, i + 1).end()
    return None


def scan(text: str, fmt: CallFormat) -> Scan:
    """The calls in `text` (an answer, whole or as far as it is written) in `fmt`."""
    result = Scan()
    first = _SPACE.match(text).end()
    marked = text.find(fmt.marker)
    if marked >= 0:
        result.start, i = marked, marked + len(fmt.marker)
    elif fmt.bare and first < len(text) and text[first] in "{[":
        result.start, i = first, first
    else:
        return result
    try:
        while True:
            i = _SPACE.match(text, i).end()
            if i >= len(text):
                return result
            i = _read_calls_at(text, i, result)
            if i is None:
                return result
            i = _SPACE.match(text, i).end()
            if fmt.close and text.startswith(fmt.close, i):
                i += len(fmt.close)
            following = text.find(fmt.marker, i)
            if following < 0:
                return result  # what follows the last call is let go
            i = following + len(fmt.marker)
    except (ValueError, json.JSONDecodeError):
        result.broken = True
        return result


def _whole(calls: list[PartCall]) -> bool:
    """Every call finished, named, with arguments that are a JSON object (or none)."""
    for call in calls:
        if not call.done or not isinstance(call.name, str):
            return False
        try:
            if not isinstance(json.loads(call.arguments or "{}"), dict):
                return False
        except ValueError:
            return False
    return bool(calls)


def _new_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def read_calls(text: str, fmt: CallFormat = HERMES) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a finished answer: the text before the first call, and each call.
    When any call does not parse, nothing is read as a call and the whole text is the content."""
    found = scan(text, fmt)
    if found.start is None or found.broken or not _whole(found.calls):
        return text, []
    content = text[:found.start]
    calls = [{"id": _new_id(), "type": "function",
              "function": {"name": c.name, "arguments": c.arguments or "{}"}} for c in found.calls]
    return (content if content.strip() else None), calls


class CallStream:
    """One streamed answer's text, split as it grows into content to send and call deltas."""

    def __init__(self, fmt: CallFormat = HERMES) -> None:
        self.fmt = fmt
        self.text = ""
        self.said = 0  # characters of the text sent as content
        self.sent: list[tuple[str, int]] = []  # per call: its id, characters of its arguments sent

    def feed(self, piece: str) -> tuple[str, list[dict]]:
        """(content to send, tool-call deltas to send) after `piece` of the answer's text."""
        self.text += piece
        found = scan(self.text, self.fmt)
        if found.start is None:
            return self._content_upto(len(self.text) - self._held_back()), []
        if not self.text[:found.start].strip():
            self.said = max(self.said, found.start)  # only space before the calls: no content, as answered whole
        content = self._content_upto(found.start)
        return content, ([] if found.broken else self._deltas(found.calls))

    def finish(self, text: str) -> tuple[str, list[dict], list[dict]]:
        """(content still to send, deltas still to send, the calls) once the answer is whole.
        When the calls do not parse, the rest of the text goes out as content."""
        self.text = text
        content, calls = read_calls(text, self.fmt)
        if not calls:
            return self._content_upto(len(text)), [], []
        found = scan(text, self.fmt)
        if not text[:found.start].strip():
            self.said = max(self.said, found.start)
        rest = self._content_upto(found.start)
        deltas = self._deltas(found.calls)
        whole = [{"id": call_id, "type": "function", "function": calls[k]["function"]}
                 for k, (call_id, _) in enumerate(self.sent)]
        return rest, deltas, whole

    def _content_upto(self, end: int) -> str:
        piece, self.said = self.text[self.said:max(end, self.said)], max(end, self.said)
        return piece

    def _held_back(self) -> int:
        """How much of the end could be the start of a call, not to send yet."""
        text = self.text
        if self.fmt.bare and not text[self.said:].strip() and self.said == 0:
            return len(text)  # an answer that may yet begin with the calls' JSON
        for k in range(min(len(self.fmt.marker) - 1, len(text)), 0, -1):
            if text.endswith(self.fmt.marker[:k]):
                return k
        return 0

    def _deltas(self, calls: list[PartCall]) -> list[dict]:
        deltas = []
        for k, call in enumerate(calls):
            if call.name is None:
                break  # a call is announced by its name; the ones after wait for it
            if k == len(self.sent):
                self.sent.append((_new_id(), 0))
                deltas.append({"index": k, "id": self.sent[k][0], "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
            call_id, given = self.sent[k]
            arguments = call.arguments or ("{}" if call.done else "")
            if len(arguments) > given:
                self.sent[k] = (call_id, len(arguments))
                deltas.append({"index": k, "function": {"arguments": arguments[given:]}})
        return deltas
