"""What a placement costs per token, priced from measured timings (profiling/ measures them).

Plain data and arithmetic, no torch: the dashboard prices a drag before anything moves.
"""

from __future__ import annotations

from dataclasses import dataclass

SHORT_KV, LONG_KV = 16, 1024  # cache lengths a decode step is timed at; cost is linear between


@dataclass(frozen=True)
class DeviceTimings:
    """Seconds on one device. Decode costs are `base + per_kv_token * kv_length`."""

    layer_decode_s: float  # one layer, one token, KV length SHORT_KV
    layer_decode_per_kv_s: float  # extra per token of KV cache
    layer_prefill_per_token_s: float
    embed_s: float
    head_s: float  # final norm + lm_head, one token
    head_prefill_per_token_s: float
    timed_as: str  # "cuda:0 (NVIDIA …)", "host CPU" …

    def layer_s(self, kv_length: int) -> float:
        return self.layer_decode_s + self.layer_decode_per_kv_s * max(kv_length - SHORT_KV, 0)


@dataclass(frozen=True)
class LinkTimings:
    latency_s: float  # one hand-over of a decode step's hidden state, mask and positions
    bytes_per_s: float  # for larger transfers (logits, prefill hidden states)


@dataclass
class Timings:
    devices: dict[str, DeviceTimings]
    links: dict[tuple[str, str], LinkTimings]
    step_overhead_s: float  # the host's per-token cost in generate: sampling, stopping, cache


# --- prediction ------------------------------------------------------------------------

PREDICTION_KV = 128  # predictions are for a decode step with this many tokens already cached


@dataclass(frozen=True)
class Prediction:
    """What a placement should cost, from measured timings, before it is applied."""

    step_s: float  # one decode step, all parts and hand-overs
    tokens_per_s: float
    block_ms: tuple[tuple[int, int, str, float], ...]  # (first, last, device, ms per step)
    transfer_ms: float  # all boundary hand-overs in one step
    kv_length: int

    def to_json(self) -> dict:
        return {
            "predicted_tokens_per_s": round(self.tokens_per_s, 2),
            "predicted_step_ms": round(self.step_s * 1000, 3),
            "predicted_transfer_ms": round(self.transfer_ms, 3),
            "predicted_at_kv_length": self.kv_length,
            "blocks": [{"first_layer": f, "last_layer": l, "device": d, "predicted_ms": round(ms, 3)}
                       for f, l, d, ms in self.block_ms],
        }


class Pricing:
    """Per-part and per-boundary seconds of one decode step; what the profiled planner minimises."""

    def __init__(self, timings: Timings, profile, kv_length: int = PREDICTION_KV):
        self.timings = timings
        self.profile = profile
        self.kv_length = kv_length

    def part_s(self, part, device: str) -> float:
        t = self.timings.devices[device]
        if part == "embed":
            return t.embed_s
        if part == "head":
            return t.head_s
        return t.layer_s(self.kv_length)

    def hand_over_s(self, src: str, dst: str) -> float:
        if src == dst:
            return 0.0
        return self.timings.links[(src, dst)].latency_s

    def logits_s(self, head: str, embed: str) -> float:
        """Logits go back from the head's device to the sampler beside the embeddings."""
        if head == embed:
            return 0.0
        link = self.timings.links[(head, embed)]
        return link.latency_s + self.profile.vocab_size * 4 / link.bytes_per_s

    def predict(self, placement) -> Prediction:
        parts = self.profile.parts()
        devices = [placement.device_of(p) for p in parts]
        compute = sum(self.part_s(p, d) for p, d in zip(parts, devices))
        transfers = sum(self.hand_over_s(a, b) for a, b in zip(devices, devices[1:]))
        transfers += self.logits_s(placement.head, placement.embed)
        step = compute + transfers + self.timings.step_overhead_s
        blocks = tuple(
            (b.layers.first, b.layers.last, b.device, 1000 * sum(self.part_s(i, b.device) for i in b.layers))
            for b in placement.blocks()
        )
        return Prediction(step, 1.0 / step, blocks, transfers * 1000, self.kv_length)
