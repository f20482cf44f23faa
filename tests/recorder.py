"""Collects what an EngineWorker emits, for tests that drive one."""

import queue
import time

TIMEOUT = 60


class Recorder:
    """Collects events from the worker's threads; waits for one of a given type."""

    def __init__(self):
        self.events = queue.Queue()
        self.seen = []

    def __call__(self, event):
        self.events.put(event)

    def wait_for(self, kind, predicate=lambda e: True, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=0.1)
            except queue.Empty:
                continue
            self.seen.append(event)
            if isinstance(event, kind) and predicate(event):
                return event
        raise AssertionError(f"no {kind.__name__} within {timeout}s; saw {[type(e).__name__ for e in self.seen]}")

    def of(self, kind):
        return [e for e in self.seen if isinstance(e, kind)]
