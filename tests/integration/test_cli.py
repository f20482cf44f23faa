"""The command line on bad input: one sentence on stderr, exit 2, no traceback."""

import json
import subprocess
import sys

import pytest

from vramancer.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "vramancer", *args], capture_output=True, text=True, timeout=300)


def assert_one_sentence(stderr: str):
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("vramancer")


def test_a_plan_that_does_not_fit_exits_2_with_need_and_room():
    result = run_cli("plan", "--devices", "sim:2x10MiB")
    assert result.returncode == 2
    assert_one_sentence(result.stderr)
    assert "model needs" in result.stderr and "sim0 10.0 MiB" in result.stderr and "sim1 10.0 MiB" in result.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        (["plan", "--devices", "sim:0x"], "at least one device"),
        (["plan", "--devices", "sim:-1GiB"], "must be positive"),
        (["plan", "--model", "/no/such/model.gguf"], "does not exist"),
        (["plan", "--model", "./no-such-folder/"], "does not exist"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "-1"], "--max-new-tokens must be 0 or more"),
        (["generate", "--prompt", "hi", "--migrate", "0-9sim2"], "not of the form"),
        (["plan", "--strategy", "random"], "not a strategy"),
        (["plan", "--context", "0"], "--context must be at least 1"),
        (["generate"], "required: --prompt"),
        (["plan", "--devices", "gpu"], "not a device"),
        (["serve", "--keep-alive-seconds", "0"], "--keep-alive-seconds must be more than 0"),
        (["serve", "--body-seconds", "inf"], "--body-seconds must be a finite number"),
        (["--serve", "0", "--header-seconds", "99999"], "--header-seconds must be more than 0 and at most 3600"),
        (["--serve", "0", "--max-batch", "0"], "--max-batch must be between 1 and 256"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(args, words, capsys):
    try:
        status = main(args)
    except SystemExit as exit_:  # argparse's own usage errors
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err
    assert_one_sentence(err)
    assert words in err


def test_missing_cuda_device_exits_2():
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 9:
        pytest.skip("this machine has a cuda:9")
    result = run_cli("plan", "--devices", "cuda:9")
    assert result.returncode == 2
    assert_one_sentence(result.stderr)
    assert "cuda:9 is not available" in result.stderr


def test_plan_json_lists_placement_and_need_per_device(capsys):
    assert main(["plan", "--devices", "sim:3x1GiB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [b["device"] for b in plan["placement"]] == ["sim0", "sim1", "sim2"]
    assert plan["placement"][0]["first_layer"] == 0 and plan["placement"][-1]["last_layer"] == 29
    # The bundled model's head is tied to its embeddings: it sits beside them, held once.
    assert plan["embed_device"] == "sim0" and plan["head_device"] == "sim0"
    # --weights auto, the default: the Q4_1 GGUF keeps its width, and the plan says why.
    assert plan["weights"] == "q4"
    assert plan["weights_reason"] == "q4: the GGUF file stores Q4_1, kept at that width (--weights auto)"
    for row in plan["devices"]:
        assert 0 < row["need"] <= row["room"] == 2**30
        assert row["need"] == row["weights"] + row["kv_cache"] + row["workspace"] + row["reserve"]


def test_plan_says_a_safetensors_model_stays_native_by_default(tiny_model_dir, capsys):
    assert main(["plan", "--model", tiny_model_dir, "--devices", "sim:2x64MiB"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert " · weights native (" in lines[0]
    assert "  weights native: a safetensors checkpoint keeps its dtype (--weights auto)" in lines


def test_devices_lists_what_the_machine_has(capsys):
    assert main(["devices", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["devices"] and all(d["total_bytes"] > 0 for d in listing["devices"])
