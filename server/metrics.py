"""Prometheus metrics, prefix ``loraserve_``. One ``Metrics`` per server, on its own registry.

The engine, the adapter cache and the servicer call the ``observe_*`` methods; gauges that are
a property of current state (running/waiting requests, KV usage, adapters per tier) are read at
scrape time from callbacks, so they are never stale.

Cardinality: the ``adapter`` label takes at most ``max_adapter_labels`` distinct names, given
out first come, first served, and only to deployed adapters (a working version is current);
every later adapter is reported as ``__other__``, and any other name (a typo, a probe, a file
that was refused) as ``__unknown__``, so neither clients nor files dropped into the folder can
spend the label slots. The base model is ``__base__``. Thousands of adapters cannot blow up the
series count. A retired adapter keeps its label value (series already exported stay valid).
With ``--auth-file``, ``loraserve_tenant_requests{tenant, adapter, code}`` says who uses what;
the ``tenant`` label is capped the same way (``-`` is a request no valid token vouched for).

Router-facing series, read at scrape time (``RouterState``): ``loraserve_lora_requests_info``
(labels ``max_lora``, ``running_lora_adapters``, ``waiting_lora_adapters``: comma-separated
names of the adapters with requests in flight; value = the time it was read), the series the
Gateway API Inference Extension's LoRA-affinity scorer reads, and ``loraserve_adapter_resident``
(``adapter``, ``tier``): the adapters resident in device slots and host memory, which that one
does not show (it lists only adapters with requests in flight). With ``--vllm-metrics`` the
first also goes out as ``vllm:lora_requests_info``, with ``vllm:num_requests_waiting``,
``vllm:num_requests_running`` and ``vllm:kv_cache_usage_perc``, for routers that read only
vLLM's names. The info series carries adapters' own names (at most ``max_adapter_labels`` of
each list); ``loraserve_adapter_resident`` caps them like every ``adapter`` label.

Besides the serving series: the process collector (RSS, CPU seconds, open fds, start time), the
platform collector, and ``loraserve_build_info`` (version, model, device, dtype). The
``_created`` series prometheus_client adds to every counter are switched off: they double the
series count and no dashboard reads them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily

BASE_LABEL = "__base__"
OTHER_LABEL = "__other__"
UNKNOWN_LABEL = "__unknown__"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class AdapterLabels:
    """Maps adapter names to a bounded set of label values."""

    def __init__(self, cap: int, known: Callable[[str], bool] = lambda name: True):
        self.cap = cap
        self.known = known  # may this name own a label? (the adapters folder holds it)
        self._given: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, name: str) -> str:
        if not name:
            return BASE_LABEL
        if not self.known(name):
            return UNKNOWN_LABEL
        with self._lock:
            if name in self._given:
                return name
            if len(self._given) < self.cap:
                self._given.add(name)
                return name
        return OTHER_LABEL


@dataclass(frozen=True)
class RouterState:
    """What a router needs to know of a replica, read at scrape time."""

    max_lora: int
    running_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    resident: dict[str, str] = field(default_factory=dict)  # adapter -> "device" | "host"


class RouterCollector:
    """The router-facing series (see the module docstring) from ``state()`` at each scrape."""

    def __init__(self, state: Callable[[], RouterState], label: AdapterLabels, vllm: bool):
        self.state, self.label, self.vllm = state, label, vllm

    def names(self, adapters: frozenset[str]) -> str:
        """The adapters' own names (a router matches them against requests' ``model``, so a
        capped label would mislead it), at most ``label.cap`` of them."""
        return ",".join(sorted(adapters)[: self.label.cap])

    def collect(self):
        st = self.state()
        info_labels = ["max_lora", "running_lora_adapters", "waiting_lora_adapters"]
        values = [
            str(st.max_lora),
            self.names(st.running_adapters),
            self.names(st.waiting_adapters),
        ]
        now = time.time()
        info = GaugeMetricFamily(
            "loraserve_lora_requests_info",
            "Adapters with requests running and waiting (comma-separated), and the device "
            "slots (max_lora); value = when it was read (unix seconds).",
            labels=info_labels,
        )
        info.add_metric(values, now)
        yield info
        resident = GaugeMetricFamily(
            "loraserve_adapter_resident",
            "Adapters resident per tier (device slots, host memory): 1 per named adapter, the "
            "count under __other__.",
            labels=["adapter", "tier"],
        )
        counts: dict[tuple[str, str], int] = {}
        for name, tier in st.resident.items():
            key = (self.label(name), tier)
            counts[key] = counts.get(key, 0) + 1
        for (name, tier), n in sorted(counts.items()):
            resident.add_metric([name, tier], n)
        yield resident
        if not self.vllm:
            return
        vllm_info = GaugeMetricFamily(
            "vllm:lora_requests_info", "As loraserve_lora_requests_info.", labels=info_labels
        )
        vllm_info.add_metric(values, now)
        yield vllm_info
        yield GaugeMetricFamily(
            "vllm:num_requests_waiting", "As loraserve_waiting_requests.", value=st.waiting
        )
        yield GaugeMetricFamily(
            "vllm:num_requests_running", "As loraserve_running_requests.", value=st.running
        )
        yield GaugeMetricFamily(
            "vllm:kv_cache_usage_perc",
            "As loraserve_kv_cache_usage_ratio (0-1).",
            value=st.kv_usage,
        )


class Metrics:
    def __init__(self, max_adapter_labels: int = 100):
        prometheus_client.disable_created_metrics()  # process-wide; no _created series
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.label = AdapterLabels(max_adapter_labels)
        self.tenant_label = AdapterLabels(max_adapter_labels)  # tenants are capped alike
        ns = "loraserve"
        self.build = Info("build", "What this server runs.", namespace=ns, registry=r)
        self.requests = Counter(
            "requests",
            "Finished gRPC requests by adapter, method (unary Generate or streaming "
            "GenerateStream, ...) and status code.",
            ["adapter", "method", "code"],
            namespace=ns,
            registry=r,
        )
        self.tenant_requests = Counter(
            "tenant_requests",
            "Finished requests by tenant (with --auth-file; '-' when no valid token was "
            "given), adapter and status code.",
            ["tenant", "adapter", "code"],
            namespace=ns,
            registry=r,
        )
        self.finished = Counter(
            "requests_finished",
            "Sequences finished by adapter and finish reason (stop, length, cancelled, error).",
            ["adapter", "finish_reason"],
            namespace=ns,
            registry=r,
        )
        self.request_duration = Histogram(
            "request_duration_seconds",
            "Time from arrival to the last token.",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            namespace=ns,
            registry=r,
        )
        self.ttft = Histogram(
            "time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            namespace=ns,
            registry=r,
        )
        self.itl = Histogram(
            "inter_token_latency_seconds",
            "Time between consecutive tokens of one request.",
            buckets=TOKEN_LATENCY_BUCKETS,
            namespace=ns,
            registry=r,
        )
        self.queue_time = Histogram(
            "queue_time_seconds",
            "Time a request waited before its prefill.",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            namespace=ns,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "prompt_tokens",
            "Prompt tokens processed.",
            ["adapter"],
            namespace=ns,
            registry=r,
        )
        self.generated_tokens = Counter(
            "generated_tokens",
            "Tokens generated.",
            ["adapter"],
            namespace=ns,
            registry=r,
        )
        self.batch_size = Histogram(
            "batch_size",
            "Sequences per engine step.",
            buckets=BATCH_BUCKETS,
            namespace=ns,
            registry=r,
        )
        self.steps = Counter("engine_steps", "Engine steps run.", namespace=ns, registry=r)
        self.running = Gauge(
            "running_requests", "Sequences being generated.", namespace=ns, registry=r
        )
        self.waiting = Gauge(
            "waiting_requests", "Requests queued, not yet admitted.", namespace=ns, registry=r
        )
        self.kv_usage = Gauge(
            "kv_cache_usage_ratio", "Fraction of KV-cache rows in use.", namespace=ns, registry=r
        )
        self.kv_tokens = Gauge(
            "kv_cache_tokens", "Token positions held in the KV cache.", namespace=ns, registry=r
        )
        self.resident = Gauge(
            "adapters_resident",
            "Adapters resident per cache tier (disk = registered).",
            ["tier"],
            namespace=ns,
            registry=r,
        )
        self.loads = Counter(
            "adapter_loads",
            "Adapter reads from disk by result (ok, invalid).",
            ["result"],
            namespace=ns,
            registry=r,
        )
        self.load_duration = Histogram(
            "adapter_load_duration_seconds",
            "Time to read and validate an adapter from disk.",
            buckets=LATENCY_BUCKETS,
            namespace=ns,
            registry=r,
        )
        self.invalid_files = Counter(
            "adapter_invalid_files",
            "Adapter files refused (each distinct reason once).",
            namespace=ns,
            registry=r,
        )
        self.invalid_now = Gauge(
            "adapters_invalid",
            "Adapters whose newest file is refused right now (0 again once fixed or removed).",
            namespace=ns,
            registry=r,
        )
        self.cache_hits = Counter(
            "adapter_cache_hits", "Adapter cache hits per tier.", ["tier"], namespace=ns, registry=r
        )
        self.cache_misses = Counter(
            "adapter_cache_misses",
            "Adapter cache misses per tier.",
            ["tier"],
            namespace=ns,
            registry=r,
        )
        self.cache_evictions = Counter(
            "adapter_cache_evictions",
            "Adapters evicted per tier.",
            ["tier"],
            namespace=ns,
            registry=r,
        )
        for tier in ("host", "device"):
            self.cache_hits.labels(tier)
            self.cache_misses.labels(tier)
            self.cache_evictions.labels(tier)
        for result in ("ok", "invalid"):
            self.loads.labels(result)

    # -------------------------------------------------------------- state read at scrape time

    def bind_state(
        self,
        engine_stats: Callable[[], dict[str, int]],
        residency: Callable[[], dict[str, int]],
        invalid: Callable[[], int] = lambda: 0,
    ) -> None:
        def stat(key: str) -> Callable[[], float]:
            return lambda: engine_stats()[key]

        self.running.set_function(stat("running"))
        self.waiting.set_function(stat("waiting"))
        self.kv_tokens.set_function(stat("kv_tokens_used"))
        self.kv_usage.set_function(
            lambda: (s := engine_stats())["kv_rows_used"] / max(1, s["kv_rows_total"])
        )
        for tier in ("disk", "host", "device"):
            self.resident.labels(tier).set_function(lambda t=tier: residency().get(t, 0))
        self.invalid_now.set_function(invalid)

    def bind_router_state(self, state: Callable[[], RouterState], vllm: bool = False) -> None:
        """Export the router-facing series from ``state`` (and under vLLM's names)."""
        self.registry.register(RouterCollector(state, self.label, vllm))

    def set_build_info(self, **info: str) -> None:
        self.build.info({k: str(v) for k, v in info.items()})

    # -------------------------------------------------------------- engine

    def observe_step(self, batch_size: int) -> None:
        self.steps.inc()
        self.batch_size.observe(batch_size)

    def observe_queue_time(self, adapter: str, seconds: float) -> None:
        self.queue_time.labels(self.label(adapter)).observe(seconds)

    def observe_first_token(self, adapter: str, seconds: float) -> None:
        self.ttft.labels(self.label(adapter)).observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def observe_finish(self, adapter: str, event) -> None:
        label = self.label(adapter)
        self.prompt_tokens.labels(label).inc(event.prompt_tokens)
        self.generated_tokens.labels(label).inc(event.completion_tokens)
        self.finished.labels(label, event.reason.value).inc()

    # -------------------------------------------------------------- adapters

    def observe_load(self, result: str, seconds: float) -> None:
        self.loads.labels(result).inc()
        self.load_duration.observe(seconds)

    def observe_invalid_file(self) -> None:
        self.invalid_files.inc()

    def observe_cache(self, tier: str, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses).labels(tier).inc()

    def observe_eviction(self, tier: str) -> None:
        self.cache_evictions.labels(tier).inc()

    # -------------------------------------------------------------- requests (servicer)

    def observe_request(
        self, adapter: str, method: str, code: str, seconds: float, tenant: str | None = None
    ) -> None:
        """``tenant``: the caller's tenant under ``--auth-file`` (``-`` for a request no token
        vouched for), None without one."""
        label = self.label(adapter)
        self.requests.labels(label, method, code).inc()
        self.request_duration.labels(label).observe(seconds)
        if tenant is not None:
            self.tenant_requests.labels(self.tenant_label(tenant), label, code).inc()

    def serve(self, port: int, host: str = "0.0.0.0"):
        """Start the ``/metrics`` HTTP endpoint; returns ``(server, port)``."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return server, server.server_port
