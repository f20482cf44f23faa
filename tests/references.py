"""What the test processes of one run build once for all of them (pytest-xdist's workers share
VRM_TEST_RUN_DIR, set by conftest.py before they start): the tiny model's folder, plain
transformers' reference answers."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path


@contextlib.contextmanager
def built_once(name: str):
    """Yields (folder, done): the run-wide folder for `name`, and whether another test process
    already built it. Held under a file lock, so a second process waits for the first's build
    instead of doing it again; the caller builds when `done` is false."""
    root = Path(os.environ["VRM_TEST_RUN_DIR"])
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = root / f"{name}.done"
        yield folder, marker.exists()
        marker.touch()


def plain_transformers_tokens(prompt: str, tokens: int) -> list[int]:
    """Plain transformers' greedy answer on the bundled model, unsplit, in float32 on the CPU:
    what every split must reproduce. Computed once per run for every test process."""
    key = hashlib.sha256(f"{tokens}:{prompt}".encode()).hexdigest()[:16]  # the same in every process
    with built_once(f"reference-{key}") as (folder, done):
        if not done:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from vramancer.model.source import bundled_model_path
            from vramancer.model.weights_cache import gguf_parsed_once

            path = bundled_model_path()
            # transformers' own load, parsing the file once instead of three times and building
            # gguf's name table once instead of per module: the same weights, sooner.
            with gguf_parsed_once():
                tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
                model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)
            with torch.inference_mode():
                output = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
            folder.mkdir(exist_ok=True)
            (folder / "tokens.json").write_text(json.dumps(output[0, inputs["input_ids"].shape[1]:].tolist()))
        return json.loads((folder / "tokens.json").read_text())
