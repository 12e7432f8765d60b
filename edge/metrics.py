"""Every Prometheus metric edge exports: names, label sets and buckets in one place.

The registry is injected so tests (and several apps in one process) never share
counters. Label values are drawn from small fixed sets; every fixed combination is
created at zero on construction so ``rate()`` works before the first failure.

With EDGE_WORKERS > 1 every worker process writes its samples to files in a directory
shared with its siblings (prometheus_client's multi-process mode, chosen by the
PROMETHEUS_MULTIPROC_DIR variable the supervisor sets before a worker starts), and
``/metrics`` on any worker reads them all (``SharedRegistry``). Counters and histograms
sum over every worker that ever ran, so they never go backwards when one is replaced;
gauges sum over the live workers (``livesum``), except limits, build info and circuit
flags, which take the largest live value (``livemax``): every worker reports the whole
service's memory limit, so ``reserved / limit`` stays meaningful. The per-worker RSS
gauge keeps its ``worker`` label. ``mark_process_dead`` drops a dead worker's gauges.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from edge import __version__
from edge.errors import OUTCOMES

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
STAGES = ("queue", "fetch", "transform", "cache_get", "cache_set")
DISCONNECT_STAGES = ("queue", "fetch", "transform", "send")
SHED_REASONS = ("queue_full", "queue_timeout", "memory", "origin")
TIMEOUT_STAGES = ("fetch", "transform", "origin")
ORIGIN_KINDS = ("file", "http", "s3")
CACHE_TIERS = ("memory", "redis", "memcached")
CACHE_RESULTS = ("hit", "miss", "stale", "error")
FORMATS = ("jpeg", "png", "webp", "avif", "gif", "other")


class SharedRegistry(CollectorRegistry):
    """A worker's registry when several processes share the port.

    Metrics register here as usual (names are still checked), but collecting reads every
    worker's files in ``path``, so whichever worker answers a scrape reports the service.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._workers = MultiProcessCollector(None, path=path)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        return self._workers.collect()  # type: ignore[no-untyped-call,no-any-return]


class Metrics:
    """The service's metrics, registered on the registry it is given.

    The counters every request moves (requests, response bytes, cache look-ups) are
    tallied as plain numbers and added to their series by ``flush``, which runs before
    every exposition and once a second; the in-flight gauge is read from its source at
    the same moments. Through prometheus_client each increment takes a lock and three
    calls: on a cache hit, a whole request of about 100 µs, those five updates cost 6%
    (bench W3). With EDGE_WORKERS > 1 another worker's scrape therefore sees this one's
    counts up to a second late. Tallies are kept from the event loop's thread only.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._tally: dict[Counter, float] = {}
        self._in_flight: Callable[[], int] = lambda: 0
        self.requests = Counter(
            "edge_requests_total",
            "Requests by HTTP status sent and outcome.",
            ["code", "outcome"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "edge_request_duration_seconds",
            "Request duration from arrival to the last byte sent, by outcome.",
            ["outcome"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.stage_duration = Histogram(
            "edge_stage_duration_seconds",
            "Time spent in each stage of a request.",
            ["stage"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.client_disconnects = Counter(
            "edge_client_disconnects_total",
            "Requests whose client went away (the 499s), by the stage they were in.",
            ["stage"],
            registry=registry,
        )
        self.load_shed = Counter(
            "edge_load_shed_total",
            "Requests answered 503, by reason.",
            ["reason"],
            registry=registry,
        )
        self.backend_timeouts = Counter(
            "edge_backend_timeouts_total",
            "Requests answered 504, by the stage the budget ran out in.",
            ["stage"],
            registry=registry,
        )
        self.origin_requests = Counter(
            "edge_origin_requests_total",
            "Requests made to origins, by origin kind and status (or error class).",
            ["kind", "code"],
            registry=registry,
        )
        self.origin_bytes = Counter(
            "edge_origin_bytes_total",
            "Bytes read from origins.",
            ["kind"],
            registry=registry,
        )
        self.cache_requests = Counter(
            "edge_cache_requests_total",
            "Cache look-ups by tier and result.",
            ["tier", "result"],
            registry=registry,
        )
        self.cache_skipped = Counter(
            "edge_cache_skipped_total",
            "Results not written to a tier because they are over its item size limit.",
            ["tier"],
            registry=registry,
        )
        self.coalesced = Counter(
            "edge_coalesced_requests",
            "Requests that joined an identical in-flight miss.",
            registry=registry,
        )
        self.inflight = Gauge(
            "edge_inflight_requests",
            "Requests being handled.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.queue_depth = Gauge(
            "edge_queue_depth",
            "Transforms waiting for a slot.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.transforms_in_progress = Gauge(
            "edge_transforms_in_progress",
            "Transforms holding a slot.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.memory_reserved = Gauge(
            "edge_memory_reserved_bytes",
            "Memory reserved by admitted transforms.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.memory_limit = Gauge(
            "edge_memory_limit_bytes",
            "The memory limit admission enforces, for the whole service.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.response_bytes = Counter(
            "edge_response_bytes_total",
            "Body bytes sent, by output format.",
            ["format"],
            registry=registry,
        )
        self.build_info = Gauge(
            "edge_build_info",
            "Always 1; the version is a label.",
            ["version"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.origin_circuit_open = Gauge(
            "edge_origin_circuit_open",
            "1 while an origin's circuit breaker is open (EDGE_ORIGINS_FILE short names).",
            ["origin"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.worker_rss = Gauge(
            "edge_worker_resident_memory_bytes",
            "Resident memory of each worker process.",
            ["worker"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._create_fixed_series()
        # children resolved once: every request is counted, and labels() takes a lock
        self._finished: dict[tuple[int, str], tuple[Counter, Histogram]] = {}
        self._sent = {fmt: self.response_bytes.labels(format=fmt) for fmt in FORMATS}

    def count_request(self, status: int, outcome: str, seconds: float) -> None:
        """One finished request: its status and outcome, and how long it took."""
        series = self._finished.get((status, outcome))
        if series is None:
            series = self._finished[status, outcome] = (
                self.requests.labels(code=str(status), outcome=outcome),
                self.request_duration.labels(outcome=outcome),
            )
        self.add(series[0])
        series[1].observe(seconds)

    def count_sent(self, fmt: str, size: int) -> None:
        """Body bytes sent in ``fmt`` (one of FORMATS; anything else counts as other)."""
        self.add(self._sent.get(fmt, self._sent["other"]), size)

    def add(self, series: Counter, amount: float = 1.0) -> None:
        """Count ``amount`` on a counter's labelled series at the next ``flush``."""
        tally = self._tally
        tally[series] = tally.get(series, 0.0) + amount

    def read_in_flight(self, source: Callable[[], int]) -> None:
        """Where ``flush`` reads the number of requests being handled."""
        self._in_flight = source

    def flush(self) -> None:
        """Add the tallied counts to their series and set the in-flight gauge."""
        tally, self._tally = self._tally, {}
        for series, amount in tally.items():
            series.inc(amount)
        self.inflight.set(self._in_flight())

    def _create_fixed_series(self) -> None:
        for outcome, code in OUTCOMES.items():
            self.requests.labels(code=str(code), outcome=outcome)
            self.request_duration.labels(outcome=outcome)
        for stage in STAGES:
            self.stage_duration.labels(stage=stage)
        for stage in DISCONNECT_STAGES:
            self.client_disconnects.labels(stage=stage)
        for reason in SHED_REASONS:
            self.load_shed.labels(reason=reason)
        for stage in TIMEOUT_STAGES:
            self.backend_timeouts.labels(stage=stage)
        for kind in ORIGIN_KINDS:
            self.origin_bytes.labels(kind=kind)
        for tier in CACHE_TIERS:
            self.cache_skipped.labels(tier=tier)
            for result in CACHE_RESULTS:
                self.cache_requests.labels(tier=tier, result=result)
        for fmt in FORMATS:
            self.response_bytes.labels(format=fmt)
        self.build_info.labels(version=__version__).set(1)
