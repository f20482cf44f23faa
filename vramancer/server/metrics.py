"""The server's Prometheus metrics, in a registry of its own (one per server, so two servers in
one process, or a test beside another, never share counts).

Device memory and link totals are the engine's own readings (the latest DeviceSample and
LinkSample), exposed by a collector at scrape time: link bytes are cumulative totals already, so
they are reported as counters as read, never re-counted. Latencies are measured in the server,
per request, from the moment its HTTP request was read.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from vramancer.engine import events as ev

# Seconds; from a few milliseconds (a token on a small model) to minutes (a long answer).
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
MEMORY_CATEGORIES = ("weights", "kv", "reserved", "other", "free")

# Without this every counter and histogram also shows a `_created` timestamp series, which
# Prometheus itself ignores; it only doubles what a person reading /metrics wades through.
disable_created_metrics()


def _flag(simulated: bool) -> str:
    return "true" if simulated else "false"


class EngineReadings:
    """A collector: device memory and utilisation, link bytes and transfers, as last sampled."""

    def __init__(self) -> None:
        self.batch: ev.BatchStatus | None = None  # the latest, for the prefix cache's totals
        self.devices: tuple[ev.DeviceSnapshot, ...] = ()
        self.links: tuple[ev.LinkSnapshot, ...] = ()
        self.simulated: dict[str, bool] = {}  # device name -> simulated, from the latest readings

    def describe(self):
        return []  # collected fresh at each scrape; nothing to check at registration

    def collect(self):
        devices, links = self.devices, self.links  # one consistent pair of readings per scrape
        memory = GaugeMetricFamily("vramancer_device_memory_bytes",
                                   "Device memory by category: this model's weights, KV cache and reserved room, "
                                   "other processes, free.", labels=["device", "category", "simulated"])
        total = GaugeMetricFamily("vramancer_device_memory_total_bytes", "Device memory in all.",
                                  labels=["device", "simulated"])
        utilisation = GaugeMetricFamily("vramancer_device_utilisation_ratio",
                                        "Device busy fraction (0-1), where the device reports it.",
                                        labels=["device", "simulated"])
        for d in devices:
            flag = _flag(d.simulated)
            for category in MEMORY_CATEGORIES:
                memory.add_metric([d.name, category, flag], getattr(d, category))
            total.add_metric([d.name, flag], d.total)
            if d.utilization is not None:  # telemetry gives percent
                utilisation.add_metric([d.name, flag], d.utilization / 100.0)
        sent = CounterMetricFamily("vramancer_link_bytes", "Bytes moved over a link between two devices.",
                                   labels=["src", "dst", "simulated"])
        transfers = CounterMetricFamily("vramancer_link_transfers", "Transfers over a link between two devices.",
                                        labels=["src", "dst", "simulated"])
        for link in links:
            labels = [link.src, link.dst, _flag(self.simulated.get(link.src, False)
                                               or self.simulated.get(link.dst, False))]
            sent.add_metric(labels, link.bytes)
            transfers.add_metric(labels, link.transfers)
        yield from (memory, total, utilisation, sent, transfers)
        yield from self._scheduler_totals()

    def _scheduler_totals(self):
        """The prefix cache's and the preemptions' totals, cumulative as the engine counts them."""
        batch = self.batch
        totals = (("vramancer_prefix_cache_hits", "Requests whose prompt began with a kept prefix.", "prefix_hits"),
                  ("vramancer_prefix_cache_misses", "Requests that found no kept prefix of their prompt.",
                   "prefix_misses"),
                  ("vramancer_prefix_cache_reused_tokens", "Prompt tokens whose keys and values were copied from "
                   "a kept prefix instead of computed.", "prefix_tokens_reused"),
                  ("vramancer_preemptions", "Sequences whose KV was dropped for room, to be computed again.",
                   "preemptions"))
        for name, text, field in totals:
            family = CounterMetricFamily(name, text)
            family.add_metric([], getattr(batch, field) if batch is not None else 0)
            yield family
        blocks = GaugeMetricFamily("vramancer_kv_blocks", "KV cache blocks held (sequences and kept prefixes), "
                                   "by kind: held, budget.", labels=["kind"])
        blocks.add_metric(["held"], batch.kv_blocks if batch is not None else 0)
        blocks.add_metric(["budget"], batch.kv_budget_blocks if batch is not None else 0)
        yield blocks


class ServerMetrics:
    """Everything /metrics shows, updated from engine events and the server's own timings."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.readings = EngineReadings()
        self.registry.register(self.readings)
        r = self.registry
        self.tokens = Counter("vramancer_generated_tokens", "Tokens generated for HTTP requests.", registry=r)
        self.prompt_tokens = Counter("vramancer_prompt_tokens", "Prompt tokens of HTTP requests the engine took.",
                                     registry=r)
        self.http = Counter("vramancer_http_requests", "Every HTTP request, by route (its template; 'unmatched' "
                            "for paths no route serves), method and the status it was answered with (499: the "
                            "client left first).", ["route", "method", "status"], registry=r)
        self.requests = Counter("vramancer_requests", "HTTP completion requests by outcome: stop, length, "
                                "cancelled, too_long, queue_full, bad_request, shutting_down, error.",
                                ["outcome"], registry=r)
        self.migrations = Counter("vramancer_migrations", "Layer moves between devices (by hand or rebalance).",
                                  registry=r)
        self.ttft = Histogram("vramancer_time_to_first_token_seconds",
                              "From the request read to its first streamed text.", buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("vramancer_inter_token_latency_seconds",
                                     "Between two pieces of text of one answer.", buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("vramancer_request_duration_seconds", "From the request read to its last token.",
                                  buckets=DURATION_BUCKETS, registry=r)
        self.running = Gauge("vramancer_running_sequences", "Sequences decoding in the batch.", registry=r)
        self.waiting = Gauge("vramancer_waiting_sequences", "Sequences waiting for room in the batch.", registry=r)
        self.batch_tokens_per_s = Gauge("vramancer_batch_tokens_per_second",
                                        "Tokens per second of all sequences together, recently.", registry=r)
        self.kv_tokens = Gauge("vramancer_kv_tokens", "KV cache slots the batch holds.", registry=r)
        self.kv_budget = Gauge("vramancer_kv_budget_tokens", "KV cache slots the plan budgets (--context).",
                               registry=r)
        self.ready = Gauge("vramancer_model_ready", "1 once a model is loaded and requests are served.", registry=r)

    def on_event(self, event: ev.Event) -> None:
        """Engine-wide readings; the per-request counts are the bridge's to record."""
        if isinstance(event, ev.DeviceSample):
            self.readings.simulated = {d.name: d.simulated for d in event.devices}
            self.readings.devices = event.devices
        elif isinstance(event, ev.LinkSample):
            self.readings.links = event.links
        elif isinstance(event, ev.BatchStatus):
            self.readings.batch = event
            self.running.set(event.running)
            self.waiting.set(event.waiting)
            self.batch_tokens_per_s.set(event.tokens_per_s)
            self.kv_tokens.set(event.kv_tokens)
            self.kv_budget.set(event.kv_budget)
        elif isinstance(event, ev.MigrationDone):
            self.migrations.inc()
        elif isinstance(event, ev.Loaded):
            self.readings.simulated = {d.name: d.simulated for d in event.devices}
            self.ready.set(1)

    def count_http(self, route: str, method: str, status: int) -> None:
        self.http.labels(route, method, str(status)).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
