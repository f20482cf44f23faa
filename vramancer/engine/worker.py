"""EngineWorker: the one thread that owns the engine.

Commands arrive on a queue and run one at a time, in order. Every request, a dashboard
prompt (Generate) as well as a server request (Submit), goes to the one scheduler
(scheduling/batching.py). While it holds requests the worker loops: read the commands that
arrived (new requests join its queue, Migrate/Reserve/Replan run there, between two steps, a
Cancel ends its request there), one scheduler step (admissions, then a decode step), then
auto-rebalance. A Load waits until the scheduler empties. One cancellation path, one
between-step point, one recovery of a lost device (the scheduler's). Each command type has its
handler in one table, so a command without one is a bug a test finds. Events go out through
`emit`, called on the worker's (or the telemetry's) thread; a UI hands them to its own thread
(Textual: `post_message`).

A Generate is answered as it always was: Token events, then one GenerationDone, or one Error
(a bad value, a prompt longer than the context); a dashboard prompt is not shown as a server
request (no RequestQueued, RequestStarted or BatchStatus for it). At Shutdown, running requests
end cancelled with the text they have and waiting ones are refused (shutting_down): each
request gets one answer, and the ones that ran keep what they made.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from vramancer.config.errors import VramancerError
from vramancer.config.units import format_bytes
from vramancer.engine import events as ev
from vramancer.engine.engine import Engine
from vramancer.engine.telemetry import DEFAULT_HISTORY, DEFAULT_HZ, Telemetry
from vramancer.platforms.devices import DeviceLost
from vramancer.planning.placement import empty_reasons
from vramancer.runtime.migration import MigrationFailed, MigrationRefused
from vramancer.scheduling.batching import Batch, encode_request

log = logging.getLogger(__name__)

REBALANCE_POLL_S = 0.5  # how often an idle worker looks for memory pressure (with --auto-rebalance)
# Requests sent together reach the worker a few milliseconds apart (each is parsed and templated
# on the server's thread first). A batch that starts waits while they keep coming, for a pause of
# GATHER_QUIET_S (at most GATHER_MAX_S in all), so their prompts share one prefill instead of
# the first running alone and the others one prefill later, while it decodes nothing. The same
# idea as Triton's dynamic-batching queue delay; a lone request pays GATHER_QUIET_S once.
GATHER_QUIET_S = 0.005
GATHER_MAX_S = 0.05

# Prompts are tokenized and templated on a pool of their own, not on the engine's thread, so a
# huge prompt (refused or not) never stalls the answers decoding. One thread: requests reach the
# scheduler in the order they were sent (first come, first served), which several threads
# would not keep. At most ENCODE_QUEUE requests wait for it; one more is refused (queue_full).
ENCODE_THREADS = 1
ENCODE_QUEUE = 64

Emit = Callable[[ev.Event], None]


@dataclass(frozen=True)
class _Encoded:
    """A request the pool encoded for `engine`: its prompt's ids, or the sentence saying why
    it could not be encoded (both None: the worker encodes it itself)."""

    command: ev.Submit | ev.Generate
    engine: Engine | None
    prompt_ids: list[int] | None = None
    error: str | None = None


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
        self._deferred: list[ev.Command] = []  # commands that wait for the scheduler to empty
        # Requests not answered yet (in the queue or in the scheduler), when each arrived, and
        # those cancelled: guarded by _lock (submit runs on any thread).
        self._lock = threading.Lock()
        self._submitted: dict[int | str, float] = {}
        self._cancelled: set[int | str] = set()
        self._served = False  # a server request came: the scheduler's status goes out too
        self._closed = False  # the worker thread is done: what the pool hands over is refused (under _lock)
        self._to_encode: queue.Queue = queue.Queue(maxsize=ENCODE_QUEUE)
        self._encoders = [threading.Thread(target=self._encode_loop, name=f"vramancer-encode-{i}", daemon=True)
                          for i in range(ENCODE_THREADS)]
        self._stopping = threading.Event()
        self._running = False  # the scheduler holds requests (no idle rebalancing meanwhile)
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
        for encoder in self._encoders:
            encoder.start()
        if self._telemetry_enabled:
            self.telemetry.start()
        return self

    def submit(self, command: ev.Command) -> None:
        """Queue a command. After Shutdown, a request is answered at once (a Generate with an
        Error, a Submit refused). A Cancel for a request that is neither queued nor running
        (already done) does nothing; for one queued or running, it ends at the next step."""
        if isinstance(command, (ev.Generate, ev.Submit)):
            with self._lock:
                stopping = self._stopping.is_set()
                if not stopping:
                    self._submitted.setdefault(command.request_id, time.perf_counter())
            if stopping:
                self._refuse_after_shutdown(command)
                return
            engine = self.engine
            if engine is not None and self._encoders[0].is_alive():
                try:
                    self._to_encode.put_nowait((command, engine))
                except queue.Full:
                    self._refuse_now(command, "queue_full", f"{ENCODE_QUEUE} requests are waiting to be read, "
                                                            "as many as may wait; try again shortly.")
                return
        if isinstance(command, ev.Cancel):
            with self._lock:
                if command.request_id in self._submitted:
                    self._cancelled.add(command.request_id)
        if isinstance(command, ev.Shutdown):
            with self._lock:  # no request slips in behind it unanswered
                self._stopping.set()
        self._commands.put(command)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop both threads: at once when idle, within one decode step when requests run."""
        self.submit(ev.Shutdown())
        self.telemetry.stop(timeout)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        for _ in self._encoders:
            try:
                self._to_encode.put(None, timeout=timeout)
            except queue.Full:
                break
        for encoder in self._encoders:
            if encoder.is_alive():
                encoder.join(timeout)

    # --- the encoding pool ---------------------------------------------------------------

    def _encode_loop(self) -> None:
        own = threading.local()  # this thread's copy of the tokenizer: a fast one changes state as it is used
        while (item := self._to_encode.get()) is not None:
            command, engine = item
            if self._stopping.is_set():
                self._hand_over(_Encoded(command, None))
                continue
            if getattr(own, "original", None) is not engine.tokenizer:
                own.original, own.copy = engine.tokenizer, copy.deepcopy(engine.tokenizer)
            try:
                request = self._as_submit(command)
                self._hand_over(_Encoded(command, engine, prompt_ids=encode_request(own.copy, request)))
            except VramancerError as exc:
                self._hand_over(_Encoded(command, engine, error=str(exc)))
            except Exception:  # anything else: the worker encodes it itself and says what is wrong
                self._hand_over(_Encoded(command, None))

    def _hand_over(self, encoded: _Encoded) -> None:
        """From the pool to the worker's queue, unless the worker is done (then refused here)."""
        with self._lock:
            closed = self._closed
            if not closed:
                self._commands.put(encoded)
        if closed:
            self._refuse_after_shutdown(encoded.command)

    @staticmethod
    def _as_submit(command: ev.Submit | ev.Generate) -> ev.Submit:
        """A dashboard prompt as a request like any other, its max_new_tokens cut to what the
        context leaves after the prompt."""
        if isinstance(command, ev.Submit):
            return command
        prompt = tuple(command.prompt) if isinstance(command.prompt, list) else command.prompt
        return ev.Submit(command.request_id, prompt, dict(command.sampling), raw=command.raw, fit_context=True)

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
        with self._lock:
            self._closed = True
        self._drain_after_shutdown()

    def _refuse_after_shutdown(self, command: ev.Command) -> None:
        """A request that arrived before Shutdown but never ran is answered, not dropped."""
        if isinstance(command, _Encoded):
            command = command.command
        if isinstance(command, (ev.Generate, ev.Submit)):
            self._refuse_now(command, "shutting_down", "the engine is shutting down; the request was not run.")

    def _refuse_now(self, command: ev.Submit | ev.Generate, reason: str, message: str) -> None:
        """Any thread: a request that will not reach the scheduler gets its one answer."""
        with self._lock:
            self._submitted.pop(command.request_id, None)
            self._cancelled.discard(command.request_id)
        if isinstance(command.request_id, int):
            self.emit(ev.Error("Generate", message))
        else:
            self.emit(ev.RequestRefused(command.request_id, reason, message))

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
            handler = self._on_encoded if isinstance(command, _Encoded) else self.handlers[type(command)]
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
        self._batch = None  # made for this engine at its first request
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

    # --- the scheduler -----------------------------------------------------------------

    def _on_generate(self, command: ev.Generate) -> None:
        """A dashboard prompt: a request to the scheduler like any other."""
        self._on_submit(self._as_submit(command))

    def _on_encoded(self, encoded: _Encoded) -> None:
        self._on_submit(encoded.command, encoded)

    def _on_submit(self, command: ev.Submit | ev.Generate, encoded: _Encoded | None = None) -> None:
        """Run the scheduler, starting with this request, until it holds none."""
        engine = self.engine
        if engine is None:
            self._request_emit(ev.RequestRefused(command.request_id, "not_ready", "no model is loaded yet."))
            return
        if self._batch is None or self._batch.engine is not engine:
            self._batch = engine.batch(self._request_emit, self.max_batch, self.max_waiting)
        batch = self._batch
        self._offer(command, encoded)
        self._running = True
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
                self._between_steps()
        except VramancerError as exc:  # e.g. a lost device's layers fit nowhere: end them all, say why
            batch.abort(str(exc))
        except Exception as exc:  # a bug must not leave requests unanswered: end them all, say why
            log.exception("the scheduler failed")
            batch.abort(f"the scheduler failed: {type(exc).__name__}: {exc}")
        finally:
            self._running = False

    def _offer(self, command: ev.Submit | ev.Generate, encoded: _Encoded | None = None) -> None:
        """Hand a request to the scheduler (with its prompt's ids when the pool encoded them
        for this engine), unless it was cancelled while it was in the queue."""
        command = self._as_submit(command)
        if encoded is not None and encoded.engine is self.engine and encoded.error is not None:
            self._request_emit(ev.RequestRefused(command.request_id, "bad_request", encoded.error))
            return
        prompt_ids = encoded.prompt_ids if encoded is not None and encoded.engine is self.engine else None
        if isinstance(command.request_id, str):
            self._served = True
        with self._lock:
            cancelled = command.request_id in self._cancelled
            arrived = self._submitted.get(command.request_id)
        if cancelled:
            self._request_emit(ev.GenerationDone(command.request_id, "", (), 0, 0, None, None, True,
                                                 finish_reason="cancelled"))
            return
        self._batch.submit(command, arrived, prompt_ids)

    def _cancel_in_batch(self) -> None:
        with self._lock:
            cancelled = list(self._cancelled)
        for request_id in cancelled:
            if self._batch.holds(request_id):
                self._batch.cancel(request_id)

    def _gather_arrivals(self) -> None:
        """Before the first step: take the commands that keep arriving (see GATHER_QUIET_S)."""
        deadline = time.monotonic() + GATHER_MAX_S
        while (wait := min(GATHER_QUIET_S, deadline - time.monotonic())) > 0:
            try:
                command = self._commands.get(timeout=wait)
            except queue.Empty:
                return
            self._take_between_steps(command)

    def _between_steps(self) -> None:
        """The one point between two steps: the commands that arrived during a step."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            self._take_between_steps(command)

    def _take_between_steps(self, command: ev.Command) -> None:
        """Requests join the scheduler's queue, Migrate, Reserve and Replan run now, a Shutdown
        ends the loop at its next turn, the rest waits until the scheduler empties."""
        if isinstance(command, (ev.Submit, ev.Generate)):
            self._offer(command)
        elif isinstance(command, _Encoded):
            self._offer(command.command, command)
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
        elif isinstance(command, ev.Shutdown):
            self._deferred.insert(0, command)
        elif not isinstance(command, ev.Cancel):  # a Cancel was recorded by `submit`
            self._deferred.append(command)

    def _request_emit(self, event: ev.Event) -> None:
        """The scheduler's events go out; a request's last one ends its bookkeeping. A
        dashboard prompt (an int id) is answered as a Generate: its refusal is an Error, and
        it is not listed as a server request."""
        request_id = getattr(event, "request_id", None)
        ended = isinstance(event, ev.GenerationDone) or (
            isinstance(event, ev.RequestRefused)  # a duplicate id refused leaves the first one be
            and not (self._batch is not None and self._batch.holds(request_id)))
        if ended:
            with self._lock:
                self._submitted.pop(request_id, None)
                self._cancelled.discard(request_id)
        if isinstance(request_id, int):
            if isinstance(event, ev.RequestRefused):
                event = ev.Error("Generate", event.message)
            elif isinstance(event, (ev.RequestQueued, ev.RequestStarted)):
                return
        if isinstance(event, ev.BatchStatus) and not self._served:
            return
        self.emit(event)

    def _on_reserve(self, command: ev.Reserve) -> None:
        engine = self._require_engine()
        engine.reserve(command.device, command.bytes)
        if command.bytes:
            self.emit(ev.Notice(f"{command.device}: {format_bytes(command.bytes)} taken by another process (simulated)."))
        else:  # a release: the simulated other process gives its memory back
            self.emit(ev.Notice(f"{command.device}: the other process's memory given back (simulated)."))
        if engine.auto_rebalance and not self._running:
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
        if engine is not None and not self._running:
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
        pass  # recorded by `submit`; a request still to come finds its id there

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
        return engine.devices, engine.link_stats(), engine.kv_bytes_by_device(), engine.tier_snapshots()


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
