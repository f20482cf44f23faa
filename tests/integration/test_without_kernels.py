"""The path of machines where our compiled CPU kernels cannot run (no AVX2, no compiler), taken
on any machine with VRM_CPU_KERNELS=off: torch's and torchao's kernels answer instead.
tests/integration/test_bundled_model.py runs the bundled model that way too."""

import json
import os
import subprocess
import sys


def generate(model: str, devices: str, *extra: str) -> dict:
    command = [sys.executable, "-m", "vramancer", "generate", "--model", model, "--devices", devices,
               "--prompt", "Hello there", "--max-new-tokens", "12", "--json", *extra]
    env = {**os.environ, "VRM_CPU_KERNELS": "off"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_without_our_kernels_q4_runs_in_bfloat16_split_as_unsplit(tiny_model_dir):
    """The fallback path end to end, as a machine without AVX2 or a compiler runs it."""
    split = generate(tiny_model_dir, "sim:2x1GiB", "--weights", "q4")
    alone = generate(tiny_model_dir, "cpu", "--weights", "q4")
    assert split["dtype"] == alone["dtype"] == "bfloat16"
    assert len({block["device"] for block in split["placement"]}) == 2
    assert split["token_ids"] == alone["token_ids"] and len(split["token_ids"]) == 12


def test_without_our_kernels_the_bundled_gguf_still_runs_at_its_width_by_default():
    """--weights auto (the default) keeps the bundled Q4_1 file at q4; without our kernels
    torchao's int4 kernels run it, in bfloat16."""
    out = generate("default", "sim:2x1GiB")
    assert (out["weights"], out["dtype"]) == ("q4", "bfloat16")
    assert len(out["token_ids"]) == 12 and len({block["device"] for block in out["placement"]}) == 2
