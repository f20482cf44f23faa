"""What structured output costs per token on the batch path: the bundled model split over
`sim:2x1GiB`, answers decoded by the continuous batch alone (no HTTP), greedy, with and without
a JSON schema held by llguidance (scheduling/constrained.py). Reported: ms per decode step of the
batch, and the mask's own ms per token (filling llguidance's bitmask and applying it). The
unconstrained and constrained batches take turns, round by round, after a warm-up round.

    python -m benchmarks.constrained [--rows 1 4] [--tokens 48] [--rounds 2]
"""

from __future__ import annotations

import json
import statistics
import time

from benchmarks.common import Result, alternate, cli

CITY = {"type": "object", "additionalProperties": False, "required": ["city", "population", "summary"],
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"},
                       "summary": {"type": "string"}}}
PROMPT = ({"role": "user", "content": "Describe Paris as JSON with its population and a long summary."},)


def run(engine, rows: int, tokens: int, schema: str | None) -> tuple[float, float]:
    """(ms per decode step, mask ms per token) for `rows` answers decoded together."""
    from vramancer.engine import events as ev
    from vramancer.scheduling import constrained
    from vramancer.scheduling.batching import Batch

    mask_s: list[float] = []
    restrict = constrained.Constraint.restrict

    def timed(self, scores):
        started = time.perf_counter()
        out = restrict(self, scores)
        mask_s.append(time.perf_counter() - started)
        return out

    constrained.Constraint.restrict = timed
    try:
        batch = Batch(engine, lambda event: None, max_batch=rows)
        for i in range(rows):
            held = ("json_schema", schema) if schema else None
            batch.submit(ev.Submit(f"r{i}", PROMPT, {"max_new_tokens": tokens}, constraint=held))
        batch.step()  # prefill (and the grammar's first mask): not a decode step
        steps, started = 0, time.perf_counter()
        while batch.busy:
            batch.step()
            steps += 1
        elapsed = time.perf_counter() - started
    finally:
        constrained.Constraint.restrict = restrict
    return 1000 * elapsed / max(steps, 1), 1000 * statistics.median(mask_s) if mask_s else 0.0


def bench(rows: list[int] = (1, 4), tokens: int = 48, rounds: int = 2) -> Result:
    import torch

    from vramancer.engine import Engine

    torch.set_num_threads(1)
    result = Result("constrained", "Structured output on the batch path: a JSON schema's cost per decode step "
                    "(bundled SmolLM2-135M, sim:2x1GiB, greedy)",
                    {"new tokens": tokens, "rounds": rounds, "torch threads": 1, "weights": "native (float32)"},
                    {"step_ms": ("ms per decode step", 1), "mask_ms": ("mask ms per token (median)", 3)})
    engine = Engine.load("default", "sim:2x1GiB", context=2048, weights="native")
    schema = json.dumps(CITY)
    try:
        contenders = {}
        for count in rows:
            answers = f"{count} answer{'s' * (count > 1)}"
            contenders[f"{answers}, unconstrained"] = sampler(engine, count, tokens, None)
            contenders[f"{answers}, json_schema"] = sampler(engine, count, tokens, schema)
        result.add(alternate(contenders, rounds))
    finally:
        engine.close()
    for count in rows:
        answers = f"{count} answer{'s' * (count > 1)}"
        result.ratio(f"{answers}: json_schema ÷ unconstrained, ms per decode step", f"{answers}, json_schema",
                     f"{answers}, unconstrained", "step_ms", False)
    result.notes.append("the mask's ms is per answer and token")
    return result


def sampler(engine, rows: int, tokens: int, schema: str | None):
    def sample():
        step, mask = run(engine, rows, tokens, schema)
        return {"step_ms": step, "mask_ms": mask} if schema else {"step_ms": step}
    return sample


if __name__ == "__main__":
    cli(bench, __doc__, [("--rows", int, [1, 4], {"nargs": "+"}), ("--tokens", int, 48), ("--rounds", int, 2)])
