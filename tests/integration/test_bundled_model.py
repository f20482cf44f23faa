"""Integration on the real bundled model (SmolLM2-135M-Instruct): split greedy decoding gives
token for token what plain transformers gives unsplit, and migrations do not change it."""

import json
import os
import subprocess
import sys

import pytest
from references import plain_transformers_tokens

pytestmark = pytest.mark.model

PROMPT = "Write a short poem about the sea."
TOKENS = 32


@pytest.fixture(scope="module")
def reference_tokens():
    """Plain transformers, unsplit, on the CPU: the tokens every split must reproduce."""
    tokens = plain_transformers_tokens(PROMPT, TOKENS)
    assert len(tokens) == TOKENS  # the prompt is chosen so the answer runs the whole length
    return tokens


def generate_json(*args, env=None):
    command = [sys.executable, "-m", "vramancer", "generate", "--model", "default", "--prompt", PROMPT,
               "--max-new-tokens", str(TOKENS), "--json", "--weights", "native", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    return result.returncode, (json.loads(result.stdout) if result.returncode == 0 else None), result.stderr


def devices_holding_layers(out):
    return {block["device"] for block in out["placement"]}


def test_two_way_split_matches_plain_transformers(reference_tokens):
    status, out, err = generate_json("--devices", "sim:2x1GiB")
    assert status == 0, err
    assert out["token_ids"] == reference_tokens
    assert devices_holding_layers(out) == {"sim0", "sim1"}
    links = {(l["src"], l["dst"]): l for l in out["links"]}
    boundary = links[("sim0", "sim1")]
    # One hand-over per forward pass (prefill + each decode step), each carrying real bytes.
    assert boundary["transfers"] >= TOKENS and boundary["bytes"] > 0 and boundary["seconds"] > 0
    assert out["new_tokens"] == TOKENS and out["decode_tokens_per_s"] > 0 and out["ttft_s"] > 0


def test_without_our_cpu_kernels_the_split_still_matches_plain_transformers(reference_tokens):
    """VRM_CPU_KERNELS=off: torch's own matmuls run every layer (the path of CPUs without AVX2
    or a compiler); the answer is the same, and `auto` still computes in float32."""
    status, out, err = generate_json("--devices", "sim:2x1GiB", env={**os.environ, "VRM_CPU_KERNELS": "off"})
    assert status == 0, err
    assert out["dtype"] == "float32"
    assert out["token_ids"] == reference_tokens


def test_three_way_and_uneven_splits_match(reference_tokens):
    from vramancer.engine import Engine

    for spec in ("sim:3x1GiB", "sim:2GiB,1GiB,1GiB"):
        engine = Engine.load("default", spec, weights="native")
        try:
            assert {b.device for b in engine.placement.blocks()} == {"sim0", "sim1", "sim2"}, spec
            result = engine.generate(PROMPT, max_new_tokens=TOKENS)
            assert result.token_ids == reference_tokens, spec
            crossed = {(l.src, l.dst) for l in engine.link_stats() if l.bytes > 0}
            assert {("sim0", "sim1"), ("sim1", "sim2")} <= crossed, spec
        finally:
            engine.close()


def test_migrations_mid_answer_keep_the_tokens(reference_tokens):
    status, out, err = generate_json("--devices", "sim:3x1GiB", "--migrate", "0-9:sim2@8", "--migrate", "20-29:sim0@16")
    assert status == 0, err
    assert out["token_ids"] == reference_tokens
    moves = [(m["first_layer"], m["last_layer"], m["dst"], m["step"]) for m in out["migrations"]]
    assert moves == [(0, 9, "sim2", 8), (20, 29, "sim0", 16)]
    assert all(m["bytes"] > 0 and m["seconds"] > 0 for m in out["migrations"])
    placement = [(b["first_layer"], b["last_layer"], b["device"]) for b in out["placement"]]
    assert placement[0] == (0, 9, "sim2") and placement[-1] == (20, 29, "sim0")


def test_a_migration_without_room_exits_2_with_need_and_room():
    status, _, err = generate_json("--devices", "sim:3x400MiB", "--migrate", "0-7:sim1@4")
    assert status == 2
    assert "Traceback" not in err
    assert "does not fit on sim1" in err and "more" in err and "free" in err
