"""EngineWorker: the one thread that owns the engine.

Commands arrive on a queue and run one at a time, in order. While a generation runs, the
queue is still read between two decode steps: Migrate and Cancel take effect there, every
other command waits its turn. Events go out through `emit`, called on the worker's (or the
telemetry's) thread; a UI hands them to its own thread (Textual: `post_message`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from vramancer.engine import events as ev
from vramancer.engine.engine import Engine
from vramancer.engine.errors import VramancerError
from vramancer.engine.migration import MigrationFailed, MigrationRefused as MigrationRefusedError
from vramancer.engine.telemetry import DEFAULT_HISTORY, DEFAULT_HZ, Telemetry
from vramancer.engine.units import format_bytes

log = logging.getLogger(__name__)

REBALANCE_POLL_S = 0.5  # how often an idle worker looks for memory pressure (with --auto-rebalance)

Emit = Callable[[ev.Event], None]


class EngineWorker:
    """Owns an Engine on a thread of its own. `submit` commands; receive events via `emit`."""

    def __init__(self, emit: Emit, telemetry_hz: float = DEFAULT_HZ, history: int = DEFAULT_HISTORY,
                 telemetry: bool = True):
        self.emit = emit
        self.engine: Engine | None = None  # touched only on the worker thread
        self._commands: queue.Queue[ev.Command] = queue.Queue()
        self._deferred: list[ev.Command] = []  # commands that arrived during a generation
        self._cancel = threading.Event()
        self._stopping = threading.Event()
        self._generating = False
        self._reported: set[str] = set()  # recovery failures already told, not repeated every poll
        self._thread = threading.Thread(target=self._run, name="vramancer-engine", daemon=True)
        self.telemetry = Telemetry(self._telemetry_source, emit, telemetry_hz, history)
        self._telemetry_enabled = telemetry

    # --- any thread --------------------------------------------------------------------

    def start(self) -> "EngineWorker":
        self._thread.start()
        if self._telemetry_enabled:
            self.telemetry.start()
        return self

    def submit(self, command: ev.Command) -> None:
        if isinstance(command, (ev.Cancel, ev.Shutdown)):
            self._cancel.set()  # seen by the generation at its next step, without waiting for the queue
        if isinstance(command, ev.Shutdown):
            self._stopping.set()
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
            self._execute(command)
            if self._stopping.is_set():
                break
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def _execute(self, command: ev.Command) -> None:
        try:
            handler = getattr(self, f"_on_{type(command).__name__.lower()}")
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
        if self.engine is not None and self.engine.split.remote is not None:
            # A node serves one coordinator at a time: let ours go before asking again.
            self.engine.close()
            self.engine = None
        engine = Engine.load(options.model, options.devices, options.strategy, options.context, options.dtype,
                             progress=progress, token_file=options.token_file)
        if self.engine is not None:
            self.engine.close()
        self.engine = engine
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
        ))
        self._plan_changed()

    def _on_replan(self, command: ev.Replan) -> None:
        self._require_engine().replan(command.strategy)
        self._plan_changed()

    def _on_migrate(self, command: ev.Migrate, step: int | None = None) -> None:
        engine = self._require_engine()
        self.emit(ev.MigrationStarted(command.first, command.last, command.device))
        try:
            result = engine.migrate(command.first, command.last, command.device, step=step)
        except (MigrationRefusedError, MigrationFailed) as exc:
            self.emit(ev.MigrationRefused(command.first, command.last, command.device, str(exc)))
            return
        except VramancerError as exc:
            if _is_node_lost(exc):  # undone as far as it could be; the caller decides what follows
                self.emit(ev.MigrationRefused(command.first, command.last, command.device, str(exc)))
            raise
        self.emit(ev.MigrationDone(result.first_layer, result.last_layer, result.src, result.dst,
                                   result.bytes, result.seconds, step))
        self._plan_changed()

    def _on_generate(self, command: ev.Generate) -> None:
        engine = self._require_engine()
        self._cancel.clear()
        if self._stopping.is_set():
            return
        prompt = list(command.prompt) if isinstance(command.prompt, tuple) else command.prompt
        self._generating = True
        try:
            result = engine.generate(
                prompt,
                raw=command.raw,
                on_text=lambda text: self.emit(ev.Token(text, command.request_id)),
                on_step=self._between_steps,
                cancel=self._cancel,
                **command.sampling,
            )
        finally:
            self._generating = False
        self.emit(ev.GenerationDone(command.request_id, result.text, tuple(result.token_ids), result.prompt_tokens,
                                    result.new_tokens, result.ttft_s, result.decode_tokens_per_s, result.cancelled))

    def _on_reserve(self, command: ev.Reserve) -> None:
        engine = self._require_engine()
        engine.reserve(command.device, command.bytes)
        self.emit(ev.Notice(f"{command.device}: {format_bytes(command.bytes)} taken by another process (simulated)."))
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
        self.emit(ev.NodeLost(message, node=node, layers=layers, recovered=recovered))
        if recovered and threading.current_thread() is self._thread:
            self._plan_changed()

    def _idle_rebalance(self) -> None:
        engine = self.engine
        if engine is not None and engine.split.remote is not None and not self._generating:
            try:
                engine.recover_lost_nodes()  # a node lost between answers: re-place its layers now
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
        pass  # nothing is generating; the flag is cleared by the next Generate

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
                except VramancerError as exc:
                    if _is_node_lost(exc):
                        raise  # the generation's recovery re-places the layers and rebuilds the cache
                    self.emit(ev.Error(type(command).__name__, str(exc)))
            elif isinstance(command, ev.Cancel):
                self._cancel.set()
            else:
                if isinstance(command, ev.Shutdown):
                    self._cancel.set()
                self._deferred.append(command)

    def _plan_changed(self) -> None:
        engine = self._require_engine()
        self.emit(ev.PlanChanged(plan_snapshot(engine)))

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


def _is_node_lost(exc: BaseException) -> bool:
    from vramancer.engine.cluster.protocol import NodeLost

    return isinstance(exc, NodeLost)


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
        kinds={d.name: d.kind for d in engine.devices},
        profile=engine.profile,
        layer_devices=tuple(placement.layer_devices),
        pricing=engine.pricing,
    )
