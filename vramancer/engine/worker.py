"""EngineWorker: the one thread that owns the engine.

Commands arrive on a queue and run one at a time, in order. While a generation runs, the
queue is still read between two decode steps: Migrate and Cancel take effect there, every
other command waits its turn. A Cancel names its request: the one streaming stops at the next
step, a queued one ends at once, cancelled. Each command type has its handler in one table,
so a command without one is a bug a test finds. Events go out through `emit`, called on the
worker's (or the telemetry's) thread; a UI hands them to its own thread (Textual:
`post_message`).

Submits (the server's requests) go to a continuous batch (scheduling/batching.py). While it holds
sequences the worker loops: read the commands that arrived (Submits join the batch's queue,
Migrate/Reserve/Replan run there, between two steps, Cancel by request id), admit what fits,
one decode step, then auto-rebalance. A Generate or a Load waits until the batch empties. At
Shutdown, running requests end cancelled with the text they have and waiting ones are refused
(shutting_down): each request gets one answer, and the ones that ran keep what they made.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from typing import Callable

from vramancer.config.errors import VramancerError
from vramancer.config.units import format_bytes
from vramancer.engine import events as ev
from vramancer.engine.engine import Engine
from vramancer.engine.telemetry import DEFAULT_HISTORY, DEFAULT_HZ, Telemetry
from vramancer.platforms.devices import DeviceLost
from vramancer.planning.placement import empty_reasons
from vramancer.runtime.migration import MigrationFailed, MigrationRefused
from vramancer.scheduling.batching import Batch

log = logging.getLogger(__name__)

REBALANCE_POLL_S = 0.5  # how often an idle worker looks for memory pressure (with --auto-rebalance)
# Requests sent together reach the worker a few milliseconds apart (each is parsed and templated
# on the server's thread first). A batch that starts waits while they keep coming, for a pause of
# GATHER_QUIET_S (at most GATHER_MAX_S in all), so their prompts share one prefill instead of
# the first running alone and the others one prefill later, while it decodes nothing. The same
# idea as Triton's dynamic-batching queue delay; a lone request pays GATHER_QUIET_S once.
GATHER_QUIET_S = 0.005
GATHER_MAX_S = 0.05

Emit = Callable[[ev.Event], None]


class EngineWorker:
    """Owns an Engine on a thread of its own. `submit` commands; receive events via `emit`."""

    def __init__(self, emit: Emit, telemetry_hz: float = DEFAULT_HZ, history: int = DEFAULT_HISTORY,
                 telemetry: bool = True, max_batch: int = 8, max_waiting: int = 64):
        self.emit = emit
        self.max_batch = max_batch  # sequences decoding together at most
        self.max_waiting = max_waiting  # Submits waiting for room at most; past that, queue_full
        self._batch: Batch | None = None  # the continuous batch on the loaded engine
        self.engine: Engine | None = None  # touched only on the worker thread
        self._commands: queue.Queue[ev.Command] = queue.Queue()
        self._deferred: list[ev.Command] = []  # commands that arrived during a generation
        self._cancel = threading.Event()  # set: the generation in progress stops at its next step
        self._cancelled: set[int] = set()  # request ids cancelled before or while they run
        self._waiting: Counter[int] = Counter()  # request ids of Generates queued, not started
        self._cancel_lock = threading.Lock()  # guards the three above and _current
        self._current: int | None = None  # the request id generating now
        # Submits not answered yet (in the queue or in the batch), when each arrived, and
        # those cancelled: guarded by _cancel_lock, like the Generate bookkeeping above.
        self._submitted: dict[str, float] = {}
        self._submits_cancelled: set[str] = set()
        self._stopping = threading.Event()
        self._generating = False
        self._reported: set[str] = set()  # recovery failures already told, not repeated every poll
        self._thread = threading.Thread(target=self._run, name="vramancer-engine", daemon=True)
        self.telemetry = Telemetry(self._telemetry_source, emit, telemetry_hz, history)
        self._telemetry_enabled = telemetry
        # One handler per command type (Shutdown ends the loop itself); a test checks every
        # command has one, so a new command cannot be silently ignored.
        self.handlers: dict[type[ev.Command], Callable] = {
            ev.Load: self._on_load,
            ev.Replan: self._on_replan,
            ev.Migrate: self._on_migrate,
            ev.Generate: self._on_generate,
            ev.Reserve: self._on_reserve,
            ev.Cancel: self._on_cancel,
            ev.Submit: self._on_submit,
        }

    # --- any thread --------------------------------------------------------------------

    def start(self) -> "EngineWorker":
        self._thread.start()
        if self._telemetry_enabled:
            self.telemetry.start()
        return self

    def submit(self, command: ev.Command) -> None:
        """Queue a command. After Shutdown, a Generate is answered with an Error event at once.
        A Cancel for a request that is neither queued nor running (already done) does nothing."""
        if isinstance(command, ev.Generate):
            with self._cancel_lock:
                if self._stopping.is_set():
                    self.emit(ev.Error("Generate", "the engine is shutting down; the request was not run."))
                    return
                self._waiting[command.request_id] += 1
        if isinstance(command, ev.Submit):
            with self._cancel_lock:
                if self._stopping.is_set():
                    self.emit(ev.RequestRefused(command.request_id, "shutting_down",
                                                "the engine is shutting down; the request was not run."))
                    return
                self._submitted.setdefault(command.request_id, time.perf_counter())
        if isinstance(command, ev.Cancel):
            with self._cancel_lock:
                if isinstance(command.request_id, str) and command.request_id in self._submitted:
                    self._submits_cancelled.add(command.request_id)
                elif command.request_id == self._current:
                    self._cancelled.add(command.request_id)
                    self._cancel.set()  # seen at the next step, without waiting for the queue
                elif self._waiting[command.request_id] > 0:
                    self._cancelled.add(command.request_id)
        if isinstance(command, ev.Shutdown):
            with self._cancel_lock:  # no Generate slips in behind it unanswered
                self._stopping.set()
            self._cancel.set()
        self._commands.put(command)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop both threads: at once when idle, within one decode step when generating."""
        self.submit(ev.Shutdown())
        self.telemetry.stop(timeout)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # --- worker thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            if self._deferred:
                command = self._deferred.pop(0)
            else:
                try:
                    command = self._commands.get(timeout=REBALANCE_POLL_S)
                except queue.Empty:
                    self._idle_rebalance()
                    continue
            if isinstance(command, ev.Shutdown):
                break
            if self._stopping.is_set():
                self._refuse_after_shutdown(command)
                continue
            self._execute(command)
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        self._drain_after_shutdown()

    def _refuse_after_shutdown(self, command: ev.Command) -> None:
        """A Generate or Submit that arrived before Shutdown but never ran is answered, not dropped."""
        if isinstance(command, ev.Generate):
            self.emit(ev.Error("Generate", "the engine is shutting down; the request was not run."))
        if isinstance(command, ev.Submit):
            self._batch_emit(ev.RequestRefused(command.request_id, "shutting_down",
                                               "the engine is shutting down; the request was not run."))

    def _drain_after_shutdown(self) -> None:
        for command in self._deferred:
            self._refuse_after_shutdown(command)
        self._deferred.clear()
        while True:
            try:
                self._refuse_after_shutdown(self._commands.get_nowait())
            except queue.Empty:
                return

    def _execute(self, command: ev.Command) -> None:
        try:
            handler = self.handlers[type(command)]
            handler(command)
        except VramancerError as exc:
            self.emit(ev.Error(type(command).__name__, str(exc)))
        except Exception as exc:  # a bug must not kill the worker: report it and keep serving
            log.exception("%s failed", type(command).__name__)
            self.emit(ev.Error(type(command).__name__, f"{type(command).__name__} failed: {type(exc).__name__}: {exc}"))

    def _on_load(self, command: ev.Load) -> None:
        options = command.options
        started = time.perf_counter()
        progress = lambda stage, fraction: self.emit(ev.LoadProgress(stage, fraction))
        if self.engine is not None and self.engine.connected:
            # A node serves one coordinator at a time: let ours go before asking again.
            self.engine.close()
            self.engine = None
        engine = Engine.load(options, progress=progress)
        if self.engine is not None:
            self.engine.close()
        self.engine = engine
        self._batch = None  # made for this engine at its first Submit
        engine.auto_rebalance = options.auto_rebalance
        engine.on_rebalance = self._rebalanced
        engine.on_fault = self._node_fault
        self.emit(ev.Loaded(
            model=engine.source.display_name,
            dtype=str(engine.dtype).removeprefix("torch."),
            strategy=engine.plan.strategy,
            context=engine.context,
            devices=tuple(ev.DeviceInfo(d.name, d.kind, d.label, d.simulated, d.read().total, d.host)
                          for d in engine.devices),
            simulated=engine.simulated,
            simulated_fallback=engine.simulated_fallback,
            seconds=time.perf_counter() - started,
            cuda_graphs=engine.cuda_graphs,
        ))
        self._plan_changed()

    def _on_replan(self, command: ev.Replan) -> None:
        started = time.perf_counter()
        self._require_engine().replan(command.strategy)
        self._plan_changed(seconds=time.perf_counter() - started)  # its moves' time, for their GB/s

    def _on_migrate(self, command: ev.Migrate, step: int | None = None) -> None:
        engine = self._require_engine()
        self.emit(ev.MigrationStarted(command.first, command.last, command.device))
        try:
            result = engine.migrate(command.first, command.last, command.device, step=step)
        except (MigrationRefused, MigrationFailed) as exc:
            self.emit(ev.MigrationNotDone(command.first, command.last, command.device, str(exc)))
            return
        except DeviceLost as exc:  # undone as far as it could be; the caller decides what follows
            self.emit(ev.MigrationNotDone(command.first, command.last, command.device, str(exc)))
            raise
        self.emit(ev.MigrationDone(result.first_layer, result.last_layer, result.src, result.dst,
                                   result.bytes, result.seconds, step))
        self._plan_changed()

    def _on_generate(self, command: ev.Generate) -> None:
        with self._cancel_lock:
            self._waiting[command.request_id] -= 1
            if self._waiting[command.request_id] <= 0:
                del self._waiting[command.request_id]
            cancelled = command.request_id in self._cancelled  # while it waited its turn
            self._cancelled.discard(command.request_id)
            if not cancelled:  # from here a Cancel for it stops it at the next step
                self._current = command.request_id
                self._cancel.clear()
        if cancelled:
            self.emit(ev.GenerationDone(command.request_id, "", (), 0, 0, None, None, True))
            return
        prompt = list(command.prompt) if isinstance(command.prompt, tuple) else command.prompt
        # Each piece of text goes out the moment the streamer lets it go, with the answer's
        # tokens so far: transformers hands a token to the streamer after the stopping
        # criteria, where `on_step` has just told its number.
        decoded = [0]

        def on_step(step: int) -> None:
            decoded[0] = step
            self._between_steps(step)

        def on_text(text: str) -> None:
            self.emit(ev.Token(text, command.request_id, step=decoded[0]))

        self._generating = True
        try:
            engine = self._require_engine()
            result = engine.generate(
                prompt,
                raw=command.raw,
                on_text=on_text,
                on_step=on_step,
                cancel=self._cancel,
                **command.sampling,
            )
        finally:
            self._generating = False
            with self._cancel_lock:
                self._current = None
                self._cancelled.discard(command.request_id)
        self.emit(ev.GenerationDone(command.request_id, result.text, tuple(result.token_ids), result.prompt_tokens,
                                    result.new_tokens, result.ttft_s, result.decode_tokens_per_s, result.cancelled))

    # --- the continuous batch ------------------------------------------------------------

    def _on_submit(self, command: ev.Submit) -> None:
        """Run the batch, starting with this request, until it holds no sequence."""
        engine = self.engine
        if engine is None:
            self._batch_emit(ev.RequestRefused(command.request_id, "not_ready", "no model is loaded yet."))
            return
        if self._batch is None or self._batch.engine is not engine:
            self._batch = engine.batch(self._batch_emit, self.max_batch, self.max_waiting)
        batch = self._batch
        self._offer(command)
        for deferred in [c for c in self._deferred if isinstance(c, ev.Submit)]:
            self._deferred.remove(deferred)  # Submits held back by a generation join now
            self._offer(deferred)
        self._generating = True
        try:
            self._gather_arrivals()
            while batch.busy:
                self._cancel_in_batch()
                if self._stopping.is_set():
                    batch.close()
                    break
                batch.step()
                if engine.auto_rebalance and batch.running:
                    engine.rebalance(batch.steps)
                self._between_batch_steps()
        except VramancerError as exc:  # e.g. a lost device's layers fit nowhere: end them all, say why
            batch.abort(str(exc))
        except Exception as exc:  # a bug must not leave requests unanswered: end them all, say why
            log.exception("the continuous batch failed")
            batch.abort(f"the batch failed: {type(exc).__name__}: {exc}")
        finally:
            self._generating = False

    def _offer(self, command: ev.Submit) -> None:
        """Hand a Submit to the batch, unless it was cancelled while it was in the queue."""
        with self._cancel_lock:
            cancelled = command.request_id in self._submits_cancelled
            arrived = self._submitted.get(command.request_id)
        if cancelled:
            self._batch_emit(ev.GenerationDone(command.request_id, "", (), 0, 0, None, None, True,
                                               finish_reason="cancelled"))
            return
        self._batch.submit(command, arrived)

    def _cancel_in_batch(self) -> None:
        with self._cancel_lock:
            cancelled = list(self._submits_cancelled)
        for request_id in cancelled:
            if self._batch.holds(request_id):
                self._batch.cancel(request_id)

    def _gather_arrivals(self) -> None:
        """Before a batch's first step: take the commands that keep arriving (see GATHER_QUIET_S)."""
        deadline = time.monotonic() + GATHER_MAX_S
        while (wait := min(GATHER_QUIET_S, deadline - time.monotonic())) > 0:
            try:
                command = self._commands.get(timeout=wait)
            except queue.Empty:
                return
            self._take_during_batch(command)

    def _between_batch_steps(self) -> None:
        """The commands that arrived during a step."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            self._take_during_batch(command)

    def _take_during_batch(self, command: ev.Command) -> None:
        """Submits join the batch's queue, Migrate, Reserve and Replan run now, the rest waits
        until the batch empties."""
        if isinstance(command, ev.Submit):
            self._offer(command)
        elif isinstance(command, (ev.Migrate, ev.Reserve, ev.Replan)):
            try:
                if isinstance(command, ev.Migrate):
                    self._on_migrate(command, step=self._batch.steps)
                elif isinstance(command, ev.Reserve):
                    self._on_reserve(command)
                    if self.engine.auto_rebalance:
                        self.engine.rebalance(self._batch.steps)  # at this very step
                else:
                    self._on_replan(command)
            except DeviceLost as lost:
                self._batch.recover(lost)  # re-place the lost layers, rebuild every sequence's KV
            except VramancerError as exc:
                self.emit(ev.Error(type(command).__name__, str(exc)))
        elif not isinstance(command, ev.Cancel):  # a Cancel was recorded by `submit`
            self._deferred.append(command)

    def _batch_emit(self, event: ev.Event) -> None:
        """The batch's events go out as they are; a request's last one ends its bookkeeping."""
        ended = isinstance(event, ev.GenerationDone) or (
            isinstance(event, ev.RequestRefused)  # a duplicate id refused leaves the first one be
            and not (self._batch is not None and self._batch.holds(event.request_id)))
        if ended and isinstance(event.request_id, str):
            with self._cancel_lock:
                self._submitted.pop(event.request_id, None)
                self._submits_cancelled.discard(event.request_id)
        self.emit(event)

    def _on_reserve(self, command: ev.Reserve) -> None:
        engine = self._require_engine()
        engine.reserve(command.device, command.bytes)
        if command.bytes:
            self.emit(ev.Notice(f"{command.device}: {format_bytes(command.bytes)} taken by another process (simulated)."))
        else:  # a release: the simulated other process gives its memory back
            self.emit(ev.Notice(f"{command.device}: the other process's memory given back (simulated)."))
        if engine.auto_rebalance and not self._generating:
            engine.rebalance()

    def _rebalanced(self, result, why: str) -> None:
        """The engine moved layers by itself (or could not): tell the UI, with the reason."""
        if result is None:
            self.emit(ev.Notice(why))
            return
        self.emit(ev.MigrationDone(result.first_layer, result.last_layer, result.src, result.dst,
                                   result.bytes, result.seconds, result.step, reason=why))
        self._plan_changed()

    def _node_fault(self, message: str, node: str, layers: str, recovered: bool) -> None:
        """A node was lost, or its layers were re-placed (any thread may call this)."""
        self.emit(ev.DeviceFault(message, node=node, layers=layers, recovered=recovered))
        if recovered and threading.current_thread() is self._thread:
            self._plan_changed()

    def _idle_rebalance(self) -> None:
        engine = self.engine
        if engine is not None and not self._generating:
            try:
                engine.recover_lost_nodes()  # a device lost between answers: re-place its layers now
            except VramancerError as exc:
                if str(exc) not in self._reported:
                    self._reported.add(str(exc))
                    self.emit(ev.Error("Recover", str(exc)))
        if engine is not None and engine.auto_rebalance:
            try:
                engine.rebalance()
            except VramancerError as exc:
                self.emit(ev.Error("Rebalance", str(exc)))

    def _on_cancel(self, command: ev.Cancel) -> None:
        pass  # recorded by `submit`; a Generate still to come finds its id there

    def _between_steps(self, step: int) -> None:
        """Runs inside generate between two decode steps: apply Migrate/Cancel, defer the rest."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, (ev.Migrate, ev.Reserve)):
                try:
                    if isinstance(command, ev.Migrate):
                        self._on_migrate(command, step=step)
                    else:
                        self._on_reserve(command)  # the engine rebalances at this very step
                except DeviceLost:
                    raise  # the generation's recovery re-places the layers and rebuilds the cache
                except VramancerError as exc:
                    self.emit(ev.Error(type(command).__name__, str(exc)))
            elif not isinstance(command, ev.Cancel):  # a Cancel was handled by `submit`
                self._deferred.append(command)

    def _plan_changed(self, seconds: float | None = None) -> None:
        engine = self._require_engine()
        self.emit(ev.PlanChanged(plan_snapshot(engine), seconds))

    def _require_engine(self) -> Engine:
        if self.engine is None:
            raise VramancerError("no model is loaded yet.")
        return self.engine

    # --- telemetry thread ----------------------------------------------------------------

    def _telemetry_source(self):
        engine = self.engine
        if engine is None:
            return None
        return engine.devices, engine.link_stats(), engine.kv_bytes_by_device()


def plan_snapshot(engine: Engine) -> ev.PlanSnapshot:
    placement = engine.placement
    needs = {name: need.total for name, need in engine.split.needs(placement).items()}
    return ev.PlanSnapshot(
        blocks=tuple(ev.BlockInfo(b["first_layer"], b["last_layer"], b["device"], b["bytes"])
                     for b in engine.placement_json()),
        embed=placement.embed,
        head=placement.head,
        strategy=engine.plan.strategy,
        context=engine.context,
        needs=needs,
        reserves={d.name: d.reserve for d in engine.devices},
        profile=engine.profile,
        layer_devices=tuple(placement.layer_devices),
        timings=engine.pricing.timings if engine.pricing is not None else None,
        streamed=tuple(sorted(engine.split.streamed.items())),
        stream_s=engine.stream_seconds(),
        tier_caps=tuple((name, cap) for name, cap in engine.split.tier_caps.items() if cap > 0),
        empty=empty_reasons(engine.profile, placement, engine.devices, engine.plan.strategy, engine.context,
                            engine.plan.rooms),
    )
