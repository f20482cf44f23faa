"""When a node goes away mid-answer: re-place its layers, rebuild the KV cache, carry on.

The lost layers go to the devices left (the neighbours of the lost block first, then whichever
has room), with their weights from the host copies this machine kept. Their KV cache died with
the node, so the generation restarts from the prompt with the tokens already produced forced,
one decode step at a time: the same forward passes, in the same shapes, as the first time, so
every layer's cache is rebuilt exactly and the greedy answer goes on as if nothing happened.
Text already streamed is not streamed again.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteriaList

from vramancer.engine.cluster.protocol import NodeLost
from vramancer.engine.errors import VramancerError
from vramancer.engine.generation import BetweenSteps, CallbackStreamer, GenerationResult, SamplingSettings
from vramancer.engine.planner import EMBED, HEAD, LayerRange, Placement, Plan, device_needs, room_shortfall
from vramancer.engine.units import format_bytes


class NoRoomAfterLoss(VramancerError):
    """A node was lost and the devices left cannot hold its layers."""


class ReplayStreamer(CallbackStreamer):
    """A streamer that can start over: after `resume(n)` it skips the prompt and n tokens."""

    def __init__(self, tokenizer, on_text):
        super().__init__(tokenizer, on_text)
        self.skip = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt and self.skip > 0:
            self.skip -= 1
            return
        super().put(value)

    def resume(self, skip: int) -> None:
        self.next_tokens_are_prompt = True
        self.skip = skip


class ForcedPrefix(LogitsProcessor):
    """Makes the first tokens of a generation the ones given, whatever the model prefers."""

    def __init__(self, prompt_length: int, tokens: list[int]):
        self.prompt_length = prompt_length
        self.tokens = tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        if step < len(self.tokens):
            forced = torch.full_like(scores, float("-inf"))
            forced[:, self.tokens[step]] = 0.0
            return forced
        return scores


class Progress(BetweenSteps):
    """BetweenSteps that remembers the tokens produced so far."""

    def __init__(self, prompt_length: int, cancel: threading.Event, on_step):
        super().__init__(prompt_length, cancel, on_step)
        self.tokens: list[int] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.tokens = input_ids[0, self.prompt_length:].tolist()
        return super().__call__(input_ids, scores, **kwargs)


def generate(engine, inputs: dict, settings: SamplingSettings, *, on_text=None, on_step=None,
             cancel: threading.Event | None = None) -> GenerationResult:
    """engine.generate's loop when some layers are remote: run_generate, plus recovery."""
    from transformers import DynamicCache

    settings.check()
    cancel = cancel or threading.Event()
    model, tokenizer = engine.model, engine.tokenizer
    prompt_length = inputs["input_ids"].shape[1]
    reported = [0]

    def once(step: int) -> None:
        if step > reported[0]:  # a replayed step was reported the first time round
            reported[0] = step
            if on_step is not None:
                on_step(step)

    streamer = ReplayStreamer(tokenizer, on_text)
    progress = Progress(prompt_length, cancel, once)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    recover_lost_nodes(engine)
    start = time.perf_counter()
    forced: list[int] = []
    losses: list[str] = []
    if settings.max_new_tokens == 0:
        output = inputs["input_ids"]
    else:
        while True:
            engine._cache = DynamicCache(config=model.config)
            processors = LogitsProcessorList([ForcedPrefix(prompt_length, forced)] if forced else [])
            try:
                with torch.inference_mode():
                    output = model.generate(
                        **inputs, **settings.generate_kwargs(), cache=engine._cache, streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([progress]), logits_processor=processors,
                        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                    )
                break
            except NodeLost as lost:
                losses.append(str(lost))
                forced = list(progress.tokens)
                mark_lost(engine, lost)
                recover_lost_nodes(engine, replay_tokens=len(forced))
                streamer.resume(len(forced))
    total = time.perf_counter() - start
    new_ids = output[0, prompt_length:].tolist()
    times = streamer.token_times
    ttft = times[0] - start if times else None
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
    return GenerationResult(
        text=tokenizer.decode(new_ids, skip_special_tokens=True), token_ids=new_ids, prompt_tokens=prompt_length,
        new_tokens=len(new_ids), ttft_s=ttft, decode_tokens_per_s=rate, total_s=total, cancelled=cancel.is_set(),
        stats={"node_losses": losses} if losses else {},
    )


def mark_lost(engine, lost: NodeLost) -> None:
    for device in engine.devices:
        node = getattr(device, "node", None)
        if node is not None and node.label == lost.node:
            node.mark_lost(lost.reason)


def recover_lost_nodes(engine, replay_tokens: int | None = None) -> bool:
    """Re-place the layers of every lost node on the devices left. True if any moved; raises
    NoRoomAfterLoss (the engine unchanged, still usable) when they do not fit."""
    for _ in range(len(engine.devices) + 1):  # each round loses one more node, or ends
        try:
            return _recover_once(engine, replay_tokens)
        except NodeLost as again:  # a node we were moving layers to went too
            mark_lost(engine, again)
    raise NoRoomAfterLoss("every node was lost while the layers were being re-placed.")


def _recover_once(engine, replay_tokens: int | None) -> bool:
    split = engine.split
    placement = split.placement
    dead = {d.name for d in engine.devices if d.lost}
    layers = [i for i, name in enumerate(placement.layer_devices) if name in dead]
    if not layers:
        return False
    nodes = sorted({d.host for d in engine.devices if d.name in dead and placement.parts_on(d.name)})
    label = _ranges(layers)
    new = rehome(engine, placement, layers)
    if new is None:
        live = [d for d in engine.devices if not d.lost]
        free = ", ".join(f"{d.name} {format_bytes(d.read().free)}" for d in live)
        raise NoRoomAfterLoss(
            f"{' and '.join(nodes)} {'were' if len(nodes) > 1 else 'was'} lost and its layers {label} fit on none "
            f"of the devices left (free: {free}); free memory or add a node, then ask again."
        )
    split.sync_ledgers(new)
    try:
        split.remote.adopt(new, layers)
    except BaseException:
        split.sync_ledgers(placement)
        raise
    split.placement = new
    split.rewire()
    engine.plan = Plan(new.copy(), engine.plan.strategy, engine.context,
                       device_needs(split.profile, new, engine.devices, engine.context),
                       {d.name: d.room() for d in engine.devices})
    homes = sorted({new.layer_devices[i] for i in layers})
    rebuild = (f"; rebuilding the KV cache from the prompt and the {replay_tokens} tokens so far"
               if replay_tokens is not None else "")
    engine.report_fault(f"{label} of lost {' and '.join(nodes)} now on {', '.join(homes)}{rebuild}.",
                        node=" ".join(nodes), layers=label, recovered=True)
    return True


def rehome(engine, placement: Placement, layers: list[int]) -> Placement | None:
    """`placement` with `layers` on live devices that have room for them, or None. A run of lost
    layers goes whole to one device if it can (a neighbour's first), else layer by layer."""
    live = [d for d in engine.devices if not d.lost]
    kinds = {d.name: d.kind for d in live}
    free = {d.name: d.read().free for d in live}
    profile, context = engine.profile, engine.context
    proposed = placement.copy()

    def fits(trial: Placement) -> bool:
        return room_shortfall(profile, placement, trial, kinds, free, context) is None

    for run in _runs(layers):
        before = placement.device_of(run[0] - 1) if run[0] > 0 else placement.embed
        after = placement.device_of(run[-1] + 1) if run[-1] + 1 < len(placement.layer_devices) else placement.head
        options = [n for n in (before, after) if n in kinds]
        options += [n for n in sorted(kinds, key=lambda n: -free[n]) if n not in options]
        for name in options:
            trial = proposed.moved(run, name)
            if fits(trial):
                proposed = trial
                break
        else:
            for index in run:
                for name in options:
                    trial = proposed.moved([index], name)
                    if fits(trial):
                        proposed = trial
                        break
                else:
                    return None
    return proposed


def _runs(layers: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for index in sorted(layers):
        if runs and runs[-1][-1] == index - 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def _ranges(layers: list[int]) -> str:
    return ", ".join(str(LayerRange(run[0], run[-1])) for run in _runs(layers))


__all__ = ["generate", "recover_lost_nodes", "rehome", "NoRoomAfterLoss", "EMBED", "HEAD"]
