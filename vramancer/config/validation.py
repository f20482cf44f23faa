"""Values checked before anything loads: each bad one is refused with one sentence.

The CLI, the dashboard and the Python API all go through these checks, so the same value
gets the same sentence everywhere, and a wrong flag never costs a model load.
"""

from __future__ import annotations

import math
import os
import re

from vramancer.config import settings
from vramancer.config.errors import VramancerError

MAX_DEVICES = 64  # the link table and the planner grow with the square of this
MAX_SEED = 2**64 - 1  # what torch.manual_seed accepts
THREADS_PER_CORE = 4  # past a few threads per core torch only loses time (and libgomp crashes)
MAX_CONTEXT = 1 << 24  # tokens; far past any model's trained length
MAX_DISCOVER_SECONDS = 600.0
MIN_TEMPERATURE = 1e-3  # below this, logits divided by it overflow float32 (inf, then nan)
PENALTY_RANGE = (0.01, 100.0)  # --repetition-penalty: past these, penalized logits overflow
MAX_TOP_K = 1 << 24  # more than any vocabulary; a top-k above the model's keeps every token
WEIGHTS = ("auto", "native", "q8", "q4")  # --weights: how weights are held (quantization/weights.py)
CUDA_GRAPHS = ("auto", "on", "off")  # --cuda-graphs (runtime/graphs.py)


_WHOLE = re.compile(r"[+-]?[0-9]+", re.ASCII)
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(nan|inf|infinity)", re.ASCII | re.IGNORECASE)


def whole_number(text: str) -> int:
    """int(), but only ASCII digits: Python's int() also reads other scripts' digits ('٢' is 2)
    and underscores and spaces, none of which a user means in a flag. ValueError otherwise."""
    if not isinstance(text, str) or not _WHOLE.fullmatch(text):
        raise ValueError(f"not a whole number: {text!r}")
    return int(text)


def decimal_number(text: str) -> float:
    """float(), but only ASCII digits, as `whole_number` (nan and inf are read, then refused
    by `finite` where a flag needs a finite value)."""
    if not isinstance(text, str) or not _DECIMAL.fullmatch(text):
        raise ValueError(f"not a number: {text!r}")
    return float(text)


def finite(flag: str, value: float) -> float:
    """`value`, or a refusal when it is nan or infinite (comparisons let nan through)."""
    if not math.isfinite(value):
        raise VramancerError(f"{flag} must be a finite number, not {value}.")
    return value


def check_sampling(max_new_tokens: int, temperature: float, top_p: float | None, top_k: int | None,
                   seed: int | None, repetition_penalty: float | None) -> None:
    """Every value generate could not use, nan and infinities included."""
    if max_new_tokens < 0:
        raise VramancerError(f"--max-new-tokens must be 0 or more, not {max_new_tokens}.")
    check_temperature(temperature)
    check_top_p(top_p)
    if top_k is not None and not 0 <= top_k <= MAX_TOP_K:
        raise VramancerError(f"--top-k must be between 0 and {MAX_TOP_K} (0: off; above the model's vocabulary it "
                             f"keeps every token), not {top_k}.")
    check_seed(seed)
    check_repetition_penalty(repetition_penalty)


MAX_PENALTY = 2.0  # OpenAI's range for presence and frequency penalties is [-2, 2]
MAX_BIAS = 100.0  # and for a logit bias [-100, 100]


def check_adjustments(presence: float, frequency: float, min_p: float | None,
                      logit_bias: dict[int, float] | None) -> None:
    for name, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
        if not -MAX_PENALTY <= finite(name, value) <= MAX_PENALTY:
            raise VramancerError(f"{name} must be between -2 and 2, not {value:g}.")
    if min_p is not None and not 0 <= finite("min_p", min_p) <= 1:
        raise VramancerError(f"min_p must be between 0 and 1, not {min_p:g}.")
    for token, bias in (logit_bias or {}).items():
        if not isinstance(token, int) or token < 0:
            raise VramancerError(f"a logit_bias key must be a token id (a whole number, 0 or more), not {token!r}.")
        if not -MAX_BIAS <= finite("a logit_bias value", bias) <= MAX_BIAS:
            raise VramancerError(f"the logit_bias of token {token} must be between -100 and 100, not {bias:g}.")


def check_temperature(value: float) -> None:
    if finite("--temperature", value) < 0:
        raise VramancerError(f"--temperature must be 0 or more, not {value:g}.")
    if 0 < value < MIN_TEMPERATURE:
        raise VramancerError(f"--temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, not {value:g}.")


def check_top_p(value: float | None) -> None:
    if value is not None and not 0 < finite("--top-p", value) <= 1:
        raise VramancerError(f"--top-p must be in (0, 1], not {value:g}.")


def check_repetition_penalty(value: float | None) -> None:
    low, high = PENALTY_RANGE
    if value is not None and not low <= finite("--repetition-penalty", value) <= high:
        raise VramancerError(f"--repetition-penalty must be between {low:g} and {high:g} (1: off), not {value:g}.")


def check_seed(value: int | None) -> None:
    if value is not None and not 0 <= value <= MAX_SEED:
        raise VramancerError(f"--seed must be between 0 and 2^64-1, not {value}.")


def check_threads(value: int) -> None:
    """0 means automatic; more than a few threads per core only makes torch slower."""
    cores = os.cpu_count() or 1
    most = THREADS_PER_CORE * cores
    if not 0 <= value <= most:
        raise VramancerError(f"--threads must be between 1 and {most} ({THREADS_PER_CORE} per core of this "
                             f"machine's {cores}; 0: automatic), not {value}.")


def check_weights(name: str) -> None:
    if name not in WEIGHTS:
        raise VramancerError(f"--weights '{name}' is not a weights format; choose auto, native, q8 or q4.")


def env_cuda_graphs() -> str:
    """VRM_CUDA_GRAPHS (or the config file's cuda_graphs) as auto, on or off (1 and 0 as on and off)."""
    text = settings.value("cuda_graphs").strip().lower()
    mode = {"1": "on", "0": "off"}.get(text, text)
    if mode not in CUDA_GRAPHS:
        raise VramancerError(f"{settings.where('cuda_graphs')} '{text}' is not a choice; choose auto, on or off.")
    return mode


def check_cuda_graphs(mode: str) -> None:
    if mode not in CUDA_GRAPHS:
        raise VramancerError(f"--cuda-graphs '{mode}' is not a choice; choose auto, on or off.")


def check_context(value: int) -> None:
    if value < 1:
        raise VramancerError(f"--context must be at least 1 token, not {value}.")
    if value > MAX_CONTEXT:
        raise VramancerError(f"--context must be at most {MAX_CONTEXT} tokens, not {value}.")


def check_device_count(count: int) -> None:
    if count > MAX_DEVICES:
        raise VramancerError(f"{count} devices are more than VRAMancer splits a model over; use at most {MAX_DEVICES}.")


def check_port(flag: str, value: int) -> None:
    if not 0 <= value < 65536:
        raise VramancerError(f"{flag} must be between 0 and 65535, not {value}.")


def check_discover_seconds(value: float, name: str = "--discover-seconds") -> None:
    """How long discovery listens: a deadline, never for ever. `name`: where the value came from."""
    if not 0 < finite(name, value) <= MAX_DISCOVER_SECONDS:
        raise VramancerError(f"{name} must be more than 0 and at most {MAX_DISCOVER_SECONDS:g}, not {value:g}.")


def check_text(what: str, text: str) -> None:
    """Text that cannot be written as UTF-8 (bytes that were not UTF-8 reach Python from argv
    as lone surrogates) is refused here, not by the tokenizer with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise VramancerError(f"{what} is not valid UTF-8 text; check the terminal's or the file's encoding.") from None


def check_prompt(prompt, raw: bool) -> None:
    """A prompt is text, or chat messages with text; raw text must not be empty (the model
    would have no token to continue from)."""
    if isinstance(prompt, str):
        check_text("the prompt", prompt)
        if raw and not prompt:
            raise VramancerError("the prompt is empty; with --raw the model needs at least one token to continue.")
        return
    for message in prompt:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            raise VramancerError("each message of a conversation needs text content.")
        check_text("the prompt", content)


# --- environment defaults ----------------------------------------------------------------


def env_text(name: str, default: str) -> str:
    """VRM_<name> (or the config file's key), or `default` when neither sets it."""
    setting = settings.lookup(name.lower())
    return default if setting.source == "default" else setting.value


def env_int(name: str, default: int) -> int:
    """VRM_<name> (or the config file's key) as a whole number, else `default`; a refusal
    names where the value came from."""
    text = env_text(name, "")
    if not text.strip():
        return default
    try:
        return whole_number(text.strip())
    except ValueError:
        raise VramancerError(f"{settings.where(name.lower())} must be a whole number, not '{text}'.") from None


def env_float(name: str, default: float) -> float:
    text = env_text(name, "")
    if not text.strip():
        return default
    try:
        value = decimal_number(text.strip())
    except ValueError:
        raise VramancerError(f"{settings.where(name.lower())} must be a number, not '{text}'.") from None
    return finite(settings.where(name.lower()), value)


MAX_TOKEN_BYTES = 4096  # a cluster token is a short secret; never read more (a big file)


def read_token_file(token_file: str) -> bytes:
    """The cluster token in `token_file`, read without torch so a bad file is refused at once."""
    return read_secret_file(token_file, "token file", "a cluster token", "the cluster's secret")


def read_secret_file(path: str, label: str, secret: str, contents: str, limit: int = MAX_TOKEN_BYTES) -> bytes:
    """A short secret on one line from the file at `path`, never reading more than `limit`
    bytes (/dev/zero, a big file). `label` names the file, `secret` what it holds and
    `contents` what to put in it, for the refusals."""
    from vramancer.config.files import read_regular

    data = read_regular(path, f"the {label}", limit)  # a FIFO or a device is refused before reading
    if len(data) > limit:
        raise VramancerError(f"the {label} {path} holds more than {limit} bytes; {secret} is a short secret on one line.")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise VramancerError(f"the {label} {path} is not UTF-8 text; put {contents} in it.") from None
    if not text:
        raise VramancerError(f"the {label} {path} is empty; put {contents} in it.")
    return text.encode()
