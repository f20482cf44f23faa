"""What structured output costs per token on the batch path: the bundled model split over
`sim:2x1GiB`, answers decoded by the continuous batch alone (no HTTP), greedy, with and without
a JSON schema held by llguidance (scheduling/constrained.py). Reported: ms per decode step of the
batch, and the mask's own ms per token (filling llguidance's bitmask and applying it).

    python -m benchmarks.constrained [--rows 1 4] [--tokens 48] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import torch

    from vramancer.engine import Engine

    torch.set_num_threads(1)
    engine = Engine.load("default", "sim:2x1GiB", context=2048, weights="native")
    schema = json.dumps(CITY)
    print("| rows | plain ms/step | json_schema ms/step | ratio | mask ms/token (median) |")
    print("|---|---|---|---|---|")
    for rows in args.rows:
        plain, held, masks = [], [], []
        for _ in range(args.rounds):
            plain.append(run(engine, rows, args.tokens, None)[0])
            step, mask = run(engine, rows, args.tokens, schema)
            held.append(step)
            masks.append(mask)
        p, h = statistics.median(plain), statistics.median(held)
        print(f"| {rows} | {p:.1f} | {h:.1f} | {h / p:.3f} | {statistics.median(masks):.2f} |", flush=True)
    engine.close()


if __name__ == "__main__":
    main()
