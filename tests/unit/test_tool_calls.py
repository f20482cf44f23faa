"""Tool calls read out of an answer's text in each format a chat template may teach: whole, and
streamed as deltas that add up to the same calls."""

import json

import pytest

from vramancer.scheduling.constrained import Constraint
from vramancer.server.errors import ApiError
from vramancer.server.tool_calls import FORMATS, HERMES, CallStream, format_of, grammar, read_calls
from vramancer.server.tools import ToolRequest

BY_NAME = {f.name: f for f in FORMATS}
ANSWERS = {  # an answer in each format, with the content before its calls
    "hermes": ('Let me look.\n', '<tool_call>\n{"name": "weather", "arguments": {"city": "Pa\\"ris }"}}\n'
                                 '</tool_call>\n<tool_call>\n{"name": "clock", "arguments": {}}\n</tool_call>'),
    "mistral": ("", '[TOOL_CALLS][{"name": "weather", "arguments": {"city": "Paris"}}, {"name": "clock"}]'),
    "phi-granite": ("", '<|tool_call|>[{"name": "weather", "arguments": {"city": "Paris", "days": [1, 2]}}]'
                        '<|/tool_call|>'),
    "llama3": ("", ' {"name": "weather", "parameters": {"city": "Paris"}}'),
}
CALLS = {"hermes": [("weather", {"city": 'Pa"ris }'}), ("clock", {})],
         "mistral": [("weather", {"city": "Paris"}), ("clock", {})],
         "phi-granite": [("weather", {"city": "Paris", "days": [1, 2]})],
         "llama3": [("weather", {"city": "Paris"})]}


def _streamed(fmt, text):
    """What a client receives when `text` streams one character at a time."""
    stream, content, deltas = CallStream(fmt), "", []
    for character in text:
        piece, more = stream.feed(character)
        content, deltas = content + piece, deltas + more
    piece, more, calls = stream.finish(text)
    return content + piece, deltas + more, calls


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_each_format_is_read_whole_and_streamed_alike(name):
    fmt, (before, calls_text) = BY_NAME[name], ANSWERS[name]
    content, calls = read_calls(before + calls_text, fmt)
    assert content == (before or None)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == CALLS[name]

    streamed_content, deltas, streamed_calls = _streamed(fmt, before + calls_text)
    assert streamed_content == before
    # Each call is announced once, with its id and name, before any of its arguments.
    heads = [d for d in deltas if "id" in d]
    assert [(d["index"], d["function"]["name"]) for d in heads] == [(i, n) for i, (n, _) in enumerate(CALLS[name])]
    arguments = {}
    for delta in deltas:
        assert delta["index"] in arguments or "id" in delta
        arguments[delta["index"]] = arguments.get(delta["index"], "") + delta["function"]["arguments"]
    assert [arguments[i] for i in range(len(calls))] == [c["function"]["arguments"] for c in calls]
    assert [c["id"] for c in streamed_calls] == [d["id"] for d in heads]
    # The arguments arrive in pieces as they are written, not as one piece at the end.
    assert len(deltas) > 2 * len(calls)


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_text_that_is_not_a_call_is_content(name):
    fmt = BY_NAME[name]
    for text in ("Just prose, no call.", fmt.marker + "{not json}", fmt.marker + '{"name": "x", "arguments": [1]}',
                 fmt.marker + '{"arguments": {}}'):
        assert read_calls(text, fmt) == (text, [])
        content, deltas, calls = _streamed(fmt, text)
        assert content == text and calls == []


def test_prose_streams_at_once_and_a_split_marker_waits():
    stream = CallStream(HERMES)
    assert stream.feed("It is sunny") == ("It is sunny", [])
    assert stream.feed(" <tool") == (" ", [])  # may begin a call: held back
    assert stream.feed("ing>") == ("<tooling>", [])


TEMPLATE_SNIPPETS = {  # what each family's template says about tools (abridged)
    "hermes": "{% if tools %}<tools>{{ tools }}</tools> <tool_call>{\"name\": ...}</tool_call>{% endif %}",
    "mistral": "{% if tools %}[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]",
    "phi-granite": "{% if tools %}<|tool|>{{ tools }}<|/tool|>{% endif %}<|tool_call|>",
    "llama3": '{% if tools %}Respond in the format {"name": function name, "parameters": dictionary of '
              'argument name and its value}.{{ tools }}{% endif %}',
}


@pytest.mark.parametrize("name", sorted(TEMPLATE_SNIPPETS))
def test_the_template_says_which_format(name):
    assert format_of(TEMPLATE_SNIPPETS[name]).name == name


@pytest.mark.parametrize("template", [None, "{{ messages }}", "{% if tools %}call tools your way{% endif %}"])
def test_a_template_without_a_known_format_is_refused(template):
    with pytest.raises(ApiError) as refused:
        format_of(template)
    assert refused.value.status == 400 and "tool" in str(refused.value)


WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}}}


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_a_required_call_grammar_takes_the_format_and_refuses_prose(name, tiny_model_dir):
    """The grammar that holds `tool_choice: required` accepts a call written in the format, and
    what it accepts is read back as that call."""
    from transformers import AutoTokenizer

    fmt, tokenizer = BY_NAME[name], AutoTokenizer.from_pretrained(tiny_model_dir)
    key = fmt.arguments_key
    call = {"name": "weather", key: {"city": "Paris"}}
    text = (f"[{json.dumps(call, separators=(',', ':'))}]" if fmt.array
            else json.dumps(call, separators=(",", ":")) if fmt.bare
            else f"{fmt.marker}\n{json.dumps(call, separators=(',', ':'))}\n{fmt.close}")
    rule = grammar(ToolRequest((WEATHER,), "required", parallel=False), fmt)
    eos = [tokenizer.eos_token_id]
    held = Constraint("lark", rule, tokenizer, len(tokenizer), eos)
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        held.accept(token)
    assert held.done
    assert [c["function"]["name"] for c in read_calls(text, fmt)[1]] == ["weather"]
    prose = Constraint("lark", rule, tokenizer, len(tokenizer), eos)
    with pytest.raises(Exception):
        for token in tokenizer("Sunny.", add_special_tokens=False)["input_ids"]:
            prose.accept(token)
