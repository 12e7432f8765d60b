"""The aiohttp application: routes, the one outcome middleware, health, and lifecycle.

The only module that knows aiohttp.web. ``create_app(settings, ...)`` takes its
dependencies so tests can pass their own (a registry, an origin). Shared objects live
under AppKeys and are built and torn down by cleanup contexts, never at import time.

The middleware owns every request's outcome: it makes the deadline and request id,
turns EdgeErrors (and unexpected exceptions, as 500) into responses, sends the response
itself so a client lost while sending is a 499 too, and writes exactly one metrics
update and one access-log line per request, cancelled ones included.

``HitsFirst``, the request handler of edge's own runner, answers fresh memory-tier hits
on URLs already worked out before routing; it follows them with the middleware's own
functions (``_follow``: id, send, metrics, access log), so both paths answer alike.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import hmac
import json
import logging
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server
from multidict import CIMultiDict
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)

from edge import imaging, system
from edge.admission import Admission
from edge.budget import Deadline
from edge.cache import ResultCache
from edge.errors import EdgeError, InvalidParameter, NotFound, Overloaded, Unauthorized
from edge.logs import ACCESS, access_line, redact
from edge.metrics import DISCONNECT_STAGES, Metrics, SharedRegistry
from edge.origins import Origin, Origins
from edge.params import ReqFormat, lenient_req, parse_key
from edge.responses import error_body
from edge.service import Incoming, Reply, Service
from edge.settings import Settings
from edge.tracing import Tracing
from edge.workers import WorkerRole

log = logging.getLogger("edge")

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
SERVICE = web.AppKey("service", Service)
WORKER = web.AppKey("worker", WorkerRole)  # set only in a worker of EDGE_WORKERS > 1
TRACING = web.AppKey("tracing", Tracing)

RESERVED = frozenset({"/metrics", "/healthz", "/readyz"})
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
}
#: on every response of the pipeline and the operator endpoints
ALWAYS_SENT = {"Accept-Ranges": "none", **SECURITY_HEADERS}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
#: X-Envoy-Expected-Rq-Timeout-Ms: ASCII digits only (str.isdigit also takes "²")
_MILLISECONDS = re.compile(r"[0-9]{1,9}")
CLIENT_HINTS = "Sec-CH-DPR, Sec-CH-Width"
TIMING_STAGES = ("cache_get", "revalidate", "fetch", "queue", "transform")
RSS_INTERVAL = 1.0
#: seconds between flushes of the tallied metrics (Metrics.flush) besides scrapes
METRICS_FLUSH_INTERVAL = 1.0
#: seconds a connection may stay open without completing a request
KEEPALIVE_TIMEOUT = 75.0
#: seconds a cancelled request gets to unwind at shutdown
CANCEL_WAIT = 1.0
#: nice levels between the event loop and the transform threads (and libvips' workers,
#: which inherit it): under overload a core is the event loop's first, so a refusal or a
#: finished transform's hand-over never waits behind pixels
TRANSFORM_NICE = 10
#: seconds a thread may hold the GIL while another waits for it (Python's default is 5 ms):
#: a transform thread back from libvips, or the loop with a request, waits at most this long
GIL_SWITCH_INTERVAL = 0.0005


@dataclass
class AppState:
    """Mutable per-process state the handlers share (lives under the STATE key)."""

    ready: bool = True
    background: set[asyncio.Task[None]] = field(default_factory=set)
    #: handler tasks of requests being served, for the shutdown drain
    serving: set[asyncio.Task[Any]] = field(default_factory=set)

    def spawn(self, work: Awaitable[None]) -> None:
        """Run ``work`` after the response, keeping a reference until it ends."""
        task = asyncio.ensure_future(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def drain(self, grace: float) -> int:
        """Wait up to ``grace`` seconds for requests being served; cancel the rest (their
        fetches and pipelines stop as for a client that left). How many were cancelled."""
        if self.serving:
            await asyncio.wait(set(self.serving), timeout=grace)
        leftover = set(self.serving)
        for task in leftover:
            task.cancel()
        if leftover:
            await asyncio.wait(leftover, timeout=CANCEL_WAIT)
        return len(leftover)


STATE = web.AppKey("state", AppState)


class PurgeLog:
    """Purges shared between the workers of one service: an append-only file of key
    prefixes in the supervisor's directory. The worker that took a purge reaches the
    shared tiers and its own memory; every other worker applies the line to its memory
    tier on its next memory-watch tick (within a second)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        # start at the end: earlier purges concern entries this process never had
        self._offset = path.stat().st_size if path.exists() else 0

    def publish(self, prefix: str) -> None:
        with self._path.open("ab") as log_file:
            log_file.write(prefix.encode() + b"\n")  # one short write: atomic with O_APPEND

    def read_new(self) -> list[str]:
        """Prefixes published since the last call (complete lines only)."""
        try:
            with self._path.open("rb") as log_file:
                log_file.seek(self._offset)
                data = log_file.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        return [line.decode() for line in complete.split(b"\n") if line]


PURGE_LOG = web.AppKey("purge_log", PurgeLog)


@dataclass(slots=True)
class RequestLog:
    """One request as the middleware follows it: its id and budget, the pipeline's reply,
    and what it learns for the headers, the metrics and the access log."""

    request_id: str
    deadline: Deadline
    #: the pipeline's answer (None for operator endpoints and failures)
    reply: Reply | None = None
    status: int = 0
    outcome: str = "internal_error"
    label: str | None = None
    cache: str | None = None
    bytes: int = 0
    format_label: str = "other"


LOG = web.RequestKey("log", RequestLog)


def create_app(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    origin: Origin | None = None,
    cache_clock: Callable[[], float] | None = None,
    tracing: Tracing | None = None,
    purge_log: Path | None = None,
) -> web.Application:
    """Build the application; ``origin`` and ``registry`` default to the settings' own,
    ``cache_clock`` to wall-clock time (tests pass their own to age entries); ``tracing``
    (``edge.tracing.from_environ``) is off unless given."""
    app = web.Application(middlewares=[outcome_middleware], client_max_size=1024)
    app[SETTINGS] = settings
    if tracing is not None:
        app[TRACING] = tracing
    if purge_log is not None:
        app[PURGE_LOG] = PurgeLog(purge_log)
    metrics = app[METRICS] = Metrics(registry if registry is not None else _default_registry())
    state = app[STATE] = AppState()
    metrics.read_in_flight(lambda: len(state.serving))
    app.cleanup_ctx.append(_publish_metrics)  # first in, so the last to stop
    app.cleanup_ctx.append(_service_context(origin, cache_clock or time.time))
    app.cleanup_ctx.append(_memory_watch)
    # [\s\S]: a key may hold any character (a newline too), for the pipeline to judge
    app.router.add_get("/healthz", healthz, expect_handler=_expect)
    app.router.add_get("/readyz", readyz, expect_handler=_expect)
    app.router.add_get("/metrics", metrics_endpoint, expect_handler=_expect)
    app.router.add_route("*", "/_edge/{tail:[\\s\\S]*}", operator_endpoint, expect_handler=_expect)
    app.router.add_get("/{key:[\\s\\S]*}", image, expect_handler=_expect)
    return app


async def _expect(request: web.Request) -> None:
    """Answer ``Expect: 100-continue``; ignore any other expectation (RFC 9110 lets a
    server do so), rather than refuse it outside the middleware that counts answers."""
    continuing = request.headers.get("Expect", "").strip().lower() == "100-continue"
    if continuing and request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


def _default_registry() -> CollectorRegistry:
    """Single-process mode: this process's metrics plus the standard process_* ones."""
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


def _service_context(
    given_origin: Origin | None, cache_clock: Callable[[], float]
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def service_context(app: web.Application) -> AsyncIterator[None]:
        settings, metrics = app[SETTINGS], app[METRICS]
        imaging.configure(settings.allowed_input_formats)
        # EDGE_MAX_CONCURRENCY and EDGE_MEMORY_LIMIT are for the whole service: a worker
        # of EDGE_WORKERS > 1 enforces its share, and reports the whole limit.
        role = app.get(WORKER)
        slots = settings.max_concurrency or system.available_cpus()
        slots = max(1, role.share(slots)) if role else slots
        memory_limit = _memory_limit_bytes(settings)
        queue = settings.queue_size if settings.queue_size is not None else 4 * slots
        origins = await Origins.from_settings(settings, metrics, default=given_origin)
        cache = ResultCache.from_settings(settings, metrics, clock=cache_clock)
        pool = concurrent.futures.ThreadPoolExecutor(
            slots,
            thread_name_prefix="edge-vips",
            initializer=system.lower_thread_priority,
            initargs=(TRANSFORM_NICE,),
        )
        admission = Admission(
            slots=slots,
            queue_size=queue,
            memory_limit=role.share(memory_limit) if role else memory_limit,
            baseline=system.resident_bytes(),
            metrics=metrics,
        )
        metrics.memory_limit.set(memory_limit)
        service = app[SERVICE] = Service(
            settings,
            tracing=app.get(TRACING),
            origins=origins,
            cache=cache,
            admission=admission,
            pool=pool,
            metrics=metrics,
        )
        await service.load_error_image()
        yield
        state = app[STATE]
        if state.background:
            await asyncio.wait(state.background, timeout=settings.shutdown_grace)
        await origins.close()
        await cache.close()
        pool.shutdown(wait=True, cancel_futures=True)

    return service_context


def _memory_limit_bytes(settings: Settings) -> int:
    limit = settings.memory_limit
    if limit.bytes is not None:
        return limit.bytes
    return int(system.available_memory() * (limit.percent or 75) / 100)


async def _publish_metrics(app: web.Application) -> AsyncIterator[None]:
    """Flush the tallied metrics once a second, for the scrapes that read them from the
    shared files (EDGE_WORKERS > 1), and once more when everything else has stopped."""
    metrics = app[METRICS]

    async def publish() -> None:
        while True:
            await asyncio.sleep(METRICS_FLUSH_INTERVAL)
            metrics.flush()

    task = asyncio.create_task(publish())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    metrics.flush()


async def _memory_watch(app: web.Application) -> AsyncIterator[None]:
    """Sample RSS for the emergency brake and the gauge; trim malloc arenas after bursts."""

    role = app.get(WORKER)
    worker_rss = app[METRICS].worker_rss.labels(worker=str(role.index if role else 0))

    broadcast, cache = app.get(PURGE_LOG), app[SERVICE].cache

    async def watch() -> None:
        trimmer, policy = system.Trimmer(), system.TrimPolicy(system.resident_bytes())
        admission, state = app[SERVICE].admission, app[STATE]

        def idle() -> bool:
            """Nothing in flight, not even a fetch, nor a transform outliving its request."""
            return not state.serving and admission.in_use == 0

        while True:
            if broadcast is not None:  # purges other workers made, for our memory tier
                for prefix in broadcast.read_new():
                    cache.purge_memory(prefix)
            rss = system.resident_bytes()
            worker_rss.set(rss)
            admission.observe_rss(rss)
            if policy.due(rss, idle=idle()):
                await asyncio.to_thread(trimmer.trim)
                # asked again: a request arriving during the trim makes its RSS no floor
                policy.trimmed(system.resident_bytes(), idle=idle())
            await asyncio.sleep(RSS_INTERVAL)

    task = asyncio.create_task(watch())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def run_server(
    settings: Settings, *, worker: WorkerRole | None = None, tracing: Tracing | None = None
) -> None:
    """Serve until SIGTERM/SIGINT; then readyz turns 503, the listener closes, and
    in-flight requests get EDGE_SHUTDOWN_GRACE seconds to finish before cleanup.

    ``worker`` is set in a worker process of EDGE_WORKERS > 1 (see ``edge.workers``): the
    port is shared (SO_REUSEPORT), metrics go to the shared directory and ``/metrics``
    reports every worker; EDGE_METRICS_PORT is then the supervisor's. In single-process
    mode EDGE_METRICS_PORT is a second site here."""
    registry = SharedRegistry(worker.metrics_dir) if worker else None
    purge_log = Path(worker.metrics_dir) / "purges.log" if worker else None
    app = create_app(settings, registry=registry, tracing=tracing, purge_log=purge_log)
    if worker:
        app[WORKER] = worker
    runner = EdgeRunner(
        app,
        access_log=None,
        handler_cancellation=True,
        # requests were drained already (AppState.drain); this only closes idle connections
        shutdown_timeout=CANCEL_WAIT,
        # aiohttp has no header-read timeout; this bounds a connection that never
        # completes a request (slowloris) as well as an idle keep-alive one
        keepalive_timeout=KEEPALIVE_TIMEOUT,
    )
    await runner.setup()
    # Everything built so far (modules, settings, clients) lives as long as the process:
    # leave it out of the collector's full passes, which would otherwise walk ~75k objects
    # for 10-20 ms every few thousand requests, a pause every request in flight waits out.
    gc.collect()
    gc.freeze()
    # Measured on W1 (2 cores, 2 slots): 60.1 req/s at the default 5 ms, 62.5 at 0.5 ms.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    site = web.TCPSite(
        runner, settings.host, settings.port, backlog=1024, reuse_port=worker is not None
    )
    await site.start()
    metrics_runner = None
    if settings.metrics_port is not None and worker is None:
        metrics_runner = await _metrics_site(app[METRICS], settings.host, settings.metrics_port)
    if not settings.signing_keys and (worker is None or worker.index == 0):
        log.warning("EDGE_SIGNING_KEYS is not set: any caller may request any variant")
    log.info(
        "edge %slistening on %s:%s, origin %s",
        f"worker {worker.index} " if worker else "",
        settings.host,
        settings.port,
        settings.origin_url,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if worker:
        worker.announce_ready()
    await stop.wait()
    app[STATE].ready = False
    log.info("shutting down: draining in-flight requests for up to %ss", settings.shutdown_grace)
    await site.stop()  # no new connections; the ones open finish their requests
    cancelled = await app[STATE].drain(settings.shutdown_grace)
    if cancelled:
        log.warning("shutdown: %d requests outlived EDGE_SHUTDOWN_GRACE and were cut", cancelled)
    await runner.cleanup()
    if metrics_runner is not None:  # scrapes keep working while the main site drains
        await metrics_runner.cleanup()
    if tracing is not None:
        tracing.shutdown()  # flush the spans still batched


class _HeaderedRequestHandler(RequestHandler):
    """aiohttp answers a request it cannot parse (bad request line, oversized headers)
    before any of edge's code runs; this gives those answers the headers every response
    carries (DESIGN.md section 5) too."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        response = super().handle_error(request, status, exc, message)
        response.headers.update(SECURITY_HEADERS)
        response.headers.setdefault("X-Request-Id", _new_request_id())
        return response


class _HeaderedServer(Server):
    def __call__(self) -> RequestHandler:
        return _HeaderedRequestHandler(self, loop=self._loop, **self._kwargs)


class EdgeRunner(web.AppRunner):
    """The AppRunner edge serves with (tests too): connections use
    ``_HeaderedRequestHandler``, and requests go to ``HitsFirst`` before the application."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        # aiohttp builds its Server inside the application; only the class that makes
        # connection handlers differs, so the instance is adopted rather than rebuilt.
        server.__class__ = _HeaderedServer
        server.request_handler = HitsFirst(self.app, server.request_handler)
        return server


#: the methods of the image route, the only route whose URLs the service remembers
HIT_METHODS = frozenset({"GET", "HEAD"})
#: response heads the hit path keeps made (a few hundred bytes each)
REMEMBERED_HEADS = 1024


class HitsFirst:
    """The server's request handler: answers a URL the service has worked out before, when
    its image is fresh in the memory tier, without routing it; every other request goes to
    the application (routing, the outcome middleware, the pipeline).

    On a warm service most requests are such hits, and aiohttp's routing and middleware
    chain plus the pipeline's general path cost about as much again as answering one
    (bench W3). The answer, its headers, its metrics and its access-log line come from the
    functions the middleware uses; a hit cannot fail, so it has no error path of its own.
    """

    def __init__(
        self,
        app: web.Application,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
    ) -> None:
        self._handler = handler
        self._service, self._settings = app[SERVICE], app[SETTINGS]
        self._budget = self._settings.backend_timeout
        self._metrics, self._state = app[METRICS], app[STATE]
        # With tracing on every request gets its span: the middleware's path makes it.
        self._enabled = TRACING not in app
        self._heads: dict[int, tuple[Mapping[str, str], CIMultiDict[str]]] = {}

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        # A request with Expect goes to the application, which answers that header first.
        if self._enabled and request.method in HIT_METHODS and "Expect" not in request.headers:
            raw_path, _, raw_query = request.raw_path.partition("?")
            deadline = Deadline.after(self._budget)
            reply = self._service.remembered_hit(raw_path, raw_query, request.headers, deadline)
            if reply is not None:
                answer = partial(self._answer, request, reply)
                return await _follow(self._metrics, self._state, request, deadline, answer)
        return await self._handler(request)

    async def _answer(
        self, request: web.BaseRequest, reply: Reply, entry: RequestLog
    ) -> web.StreamResponse:
        entry.reply = reply
        _note_reply(entry, reply)
        head = self._head_of(reply) if reply.shared else None
        return _reply_response(request, self._settings, reply, head)

    def _head_of(self, reply: Reply) -> CIMultiDict[str]:
        """``_reply_head(reply)``, made once per shared set of reply headers (the service
        hands every unconditional hit on one entry the same headers)."""
        known = self._heads.get(id(reply.headers))
        if known is not None and known[0] is reply.headers:
            return known[1]
        head = _reply_head(reply)
        if len(self._heads) >= REMEMBERED_HEADS:
            del self._heads[next(iter(self._heads))]  # the oldest goes first
        # the headers are kept with their head: their id cannot be reused meanwhile
        self._heads[id(reply.headers)] = (reply.headers, head)
        return head


async def _metrics_site(metrics: Metrics, host: str, port: int) -> web.AppRunner:
    """EDGE_METRICS_PORT in single-process mode: only ``/metrics``, on its own port."""

    async def metrics_only(request: web.Request) -> web.Response:
        return await _exposition(metrics)

    app = web.Application()
    app.router.add_get("/metrics", metrics_only)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("metrics on %s:%s/metrics", host, port)
    return runner


# --- the outcome middleware -------------------------------------------------------------


@web.middleware
async def outcome_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.path in RESERVED:  # not requests of the pipeline: not counted or logged
        always = {**SECURITY_HEADERS, "X-Request-Id": _request_id(request)}
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # e.g. POST /healthz
            exc.headers.update(always)
            raise
        response.headers.update(always)
        return response
    app = request.app
    metrics, state = app[METRICS], app[STATE]
    deadline = _deadline(request, app[SETTINGS])
    respond = partial(_respond, request, handler)
    tracing = app.get(TRACING)
    if tracing is None:
        return await _follow(metrics, state, request, deadline, respond)
    deadline.observer = tracing.stage_span
    with tracing.request_span("edge", request.headers):
        return await _follow(metrics, state, request, deadline, respond)


async def _follow(
    metrics: Metrics,
    state: AppState,
    request: web.BaseRequest,
    deadline: Deadline,
    respond: Callable[[RequestLog], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    """Follow one request of the pipeline from its id to its access-log line: answer it
    with ``respond``, send the answer, and account for it whatever happens."""
    # The task stays a local: kept in the log, it would close a cycle (request, log, task,
    # its result the response, the request) that holds bodies until a full collection.
    entry = request[LOG] = RequestLog(_request_id(request), deadline)
    serving, task = state.serving, asyncio.current_task()
    if task is not None:  # in flight: the gauge reads this set (Metrics.flush)
        serving.add(task)
    try:
        response = await respond(entry)
        await _send(state, request, response, entry)
        return response
    except asyncio.CancelledError:
        _client_closed(entry, deadline)
        raise
    finally:
        serving.discard(task)
        _account(metrics, request, entry)


async def _respond(
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    entry: RequestLog,
) -> web.StreamResponse:
    """Run the handler; every failure becomes the response its class prescribes."""
    try:
        response = await handler(request)
    except EdgeError as error:
        return _error_response(request, error, entry)
    except web.HTTPException as exc:  # routing: 405 for other methods, and the like
        entry.status, entry.outcome = exc.status, _outcome_for_status(exc.status)
        common = _common_headers(request, request.app[SETTINGS])
        headers = {**exc.headers, **common, "Cache-Control": "no-store"}
        return web.Response(status=exc.status, body=exc.body, headers=headers)
    except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
        raise
    except Exception:
        log.exception("unexpected error handling %s", redact(request.path_qs))
        bug = EdgeError("an unexpected error occurred; it has been logged")
        return _error_response(request, bug, entry, trace=traceback.format_exc())
    if entry.reply is not None:
        _note_reply(entry, entry.reply)
    else:  # operator endpoints answer plain responses
        entry.status, entry.outcome = response.status, _outcome_for_status(response.status)
    return response


def _note_reply(entry: RequestLog, reply: Reply) -> None:
    """What the pipeline's reply tells the metrics and the access log."""
    entry.status, entry.outcome = reply.status, reply.outcome
    entry.cache, entry.format_label = reply.cache, reply.format_label
    if reply.error is not None:  # an image stood in: count the failure it answers for
        entry.label = reply.error.label


async def _send(
    state: AppState, request: web.BaseRequest, response: web.StreamResponse, entry: RequestLog
) -> None:
    """Send the response here, not after the middleware, so a lost client is a 499."""
    deadline = entry.deadline
    deadline.current = "send"
    try:
        await response.prepare(request)
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        if request.transport is None or request.transport.is_closing():
            _client_closed(entry, deadline)
            return
        raise
    deadline.current = None
    reply = entry.reply
    if request.method != "HEAD":  # body bytes, not the headers' too; HEAD sends none
        entry.bytes = len(reply.body) if reply is not None else _body_length(response)
    if reply is not None and reply.after is not None and entry.outcome == "ok":
        state.spawn(reply.after())


def _body_length(response: web.StreamResponse) -> int:
    return (response.content_length or 0) if isinstance(response, web.Response) else 0


def _client_closed(entry: RequestLog, deadline: Deadline) -> None:
    stage = deadline.current if deadline.current in DISCONNECT_STAGES else "fetch"
    entry.status, entry.outcome, entry.label = 499, "client_closed", stage


def _account(metrics: Metrics, request: web.BaseRequest, entry: RequestLog) -> None:
    """One metrics update and one access-log line for the request, whatever happened."""
    deadline = entry.deadline
    duration = time.monotonic() - deadline.started
    metrics.count_request(entry.status, entry.outcome, duration)
    for stage, seconds in deadline.spent.items():
        # cache_get and cache_set are observed by the cache itself (sets run after sending)
        if stage in ("queue", "fetch", "transform"):
            metrics.stage_duration.labels(stage=stage).observe(seconds)
    if entry.outcome == "client_closed":
        metrics.client_disconnects.labels(stage=entry.label or "fetch").inc()
    elif entry.outcome == "overloaded":
        metrics.load_shed.labels(reason=entry.label or "origin").inc()
    elif entry.outcome == "timeout":
        metrics.backend_timeouts.labels(stage=entry.label or "fetch").inc()
    if entry.bytes:
        metrics.count_sent(entry.format_label, entry.bytes)
    if not ACCESS.isEnabledFor(logging.INFO):
        return  # EDGE_LOG_LEVEL=warning: the line would be built for nothing
    fields = {
        "request_id": entry.request_id,
        "method": request.method,
        "path": redact(request.path_qs),
        "status": entry.status,
        "outcome": entry.outcome,
        "reason": entry.label,
        "cache": entry.cache,
        "bytes": entry.bytes,
        "duration_ms": round(duration * 1000, 2),
        "stages_ms": {k: round(v * 1000, 2) for k, v in deadline.spent.items()},
    }
    ACCESS.info(access_line(fields))


def _error_response(
    request: web.Request,
    error: EdgeError,
    entry: RequestLog,
    *,
    trace: str | None = None,
) -> web.Response:
    settings = request.app[SETTINGS]
    entry.status, entry.outcome, entry.label = error.status, error.outcome, error.label
    fmt = _requested_format(request)
    body = error_body(
        error,
        level=settings.error_detail,
        request_id=entry.request_id,
        fmt=fmt,
        traceback=trace,
    )
    headers = _common_headers(request, settings)
    headers["Content-Type"] = body.content_type
    if error.cacheable and settings.error_max_age > 0:
        headers["Cache-Control"] = f"public, max-age={settings.error_max_age}"
    else:
        headers["Cache-Control"] = "no-store"
    if isinstance(error, Overloaded):
        headers["Retry-After"] = str(error.retry_after)
    return web.Response(status=error.status, body=body.data, headers=headers)


def _requested_format(request: web.Request) -> ReqFormat:
    """The body format named by ``req=...,json|xml``, read leniently for error bodies."""
    _, fmt = lenient_req(request.query.items())
    return ReqFormat(fmt) if fmt in ("json", "xml") else ReqFormat.TEXT


def _outcome_for_status(status: int) -> str:
    if status < 300:
        return "ok"
    return {
        304: "not_modified",
        400: "bad_request",
        401: "unauthorized",
        403: "forbidden",
        404: "not_found",
        503: "overloaded",
    }.get(status, "bad_request" if status < 500 else "internal_error")


def _request_id(request: web.BaseRequest) -> str:
    given = request.headers.get("X-Request-Id")
    if given and _REQUEST_ID.fullmatch(given):
        return given
    return _new_request_id()


def _new_request_id() -> str:
    return os.urandom(16).hex()  # as random as uuid4's hex, at a fraction of its cost


def _deadline(request: web.Request, settings: Settings) -> Deadline:
    deadline = Deadline.after(settings.backend_timeout)
    envoy = request.headers.get("X-Envoy-Expected-Rq-Timeout-Ms")
    if envoy and _MILLISECONDS.fullmatch(envoy):
        deadline.shorten_to((int(envoy) - 100) / 1000)
    return deadline


def _common_headers(request: web.BaseRequest, settings: Settings) -> dict[str, str]:
    """The headers of every answer of the pipeline: the constant ones, id, timing, CORS."""
    headers = dict(ALWAYS_SENT)
    _add_request_headers(headers, request, settings)
    return headers


def _add_request_headers(
    headers: MutableMapping[str, str], request: web.BaseRequest, settings: Settings
) -> None:
    """The headers each request has its own values of: id, Server-Timing, CORS."""
    entry = request[LOG]
    headers["X-Request-Id"] = entry.request_id
    timings = []  # a loop, not a comprehension: this runs on every hit
    for stage, seconds in entry.deadline.spent.items():
        if stage in TIMING_STAGES:
            timings.append(f"{stage};dur={seconds * 1000:.1f}")
    if timings:
        headers["Server-Timing"] = ", ".join(timings)
        headers["Timing-Allow-Origin"] = "*"
    origins = settings.cors_origins
    if not origins:
        return
    if "*" in origins:
        headers["Access-Control-Allow-Origin"] = "*"
        return
    caller = request.headers.get("Origin")
    if caller and caller in origins:
        headers["Access-Control-Allow-Origin"] = caller
    # with or without the header: a shared cache must not give an answer made for no
    # Origin (or another one) to an allowed origin, which would then be refused it
    vary = headers.get("Vary")
    headers["Vary"] = f"{vary}, Origin" if vary else "Origin"


# --- handlers ---------------------------------------------------------------------------


async def image(request: web.Request) -> web.StreamResponse:
    """Every object key: the image pipeline."""
    raw_path, _, raw_query = request.raw_path.partition("?")
    entry = request[LOG]
    incoming = Incoming(
        raw_path=raw_path,
        raw_query=raw_query,
        read_query=lambda: list(request.query.items()),
        headers=request.headers,
        request_id=entry.request_id,
        deadline=entry.deadline,
    )
    reply = entry.reply = await request.app[SERVICE].handle(incoming)
    return _reply_response(request, request.app[SETTINGS], reply)


def _reply_response(
    request: web.BaseRequest,
    settings: Settings,
    reply: Reply,
    head: CIMultiDict[str] | None = None,
) -> web.Response:
    """The pipeline's reply as an HTTP response; ``head`` is ``_reply_head(reply)`` when
    the caller has it already."""
    if head is None:
        head = _reply_head(reply)
    response = web.Response(status=reply.status, body=reply.body, headers=head)
    _add_request_headers(response.headers, request, settings)
    return response


def _reply_head(reply: Reply) -> CIMultiDict[str]:
    """The headers a reply's response carries whichever request it answers."""
    head = CIMultiDict(ALWAYS_SENT)
    head.update(reply.headers)
    if reply.cache is not None:
        head["X-Edge-Cache"] = reply.cache
    # Browsers only honour Accept-CH on documents; sent here for CDNs and clients that read it.
    head["Accept-CH"] = CLIENT_HINTS
    return head


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers. Never touches origin, cache or slots."""
    return web.Response(text="ok\n", headers=SECURITY_HEADERS)


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 503 once shutdown has begun, so load balancers drain us first."""
    if request.app[STATE].ready:
        return web.Response(text="ready\n", headers=SECURITY_HEADERS)
    return web.Response(status=503, text="shutting down\n", headers=SECURITY_HEADERS)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Prometheus exposition (every worker's with EDGE_WORKERS > 1: the registry reads
    them all); 404 here when EDGE_METRICS_PORT serves it on its own port."""
    if request.app[SETTINGS].metrics_port is not None:
        text = "metrics are served on EDGE_METRICS_PORT\n"
        return web.Response(status=404, text=text, headers=SECURITY_HEADERS)
    return await _exposition(request.app[METRICS])


async def _exposition(metrics: Metrics) -> web.Response:
    metrics.flush()
    body = await asyncio.to_thread(generate_latest, metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def operator_endpoint(request: web.Request) -> web.Response:
    """``/_edge/...``: off (404) until EDGE_ADMIN_TOKEN is set; then Bearer-only (401)."""
    token = request.app[SETTINGS].admin_token
    if not token:
        raise NotFound("operator endpoints are not enabled (EDGE_ADMIN_TOKEN)")
    # header text arrives surrogate-escaped when it is not UTF-8: compare the bytes sent
    given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given, f"Bearer {token}".encode()):
        raise Unauthorized("operator endpoints need Authorization: Bearer <EDGE_ADMIN_TOKEN>")
    action = (request.method, request.match_info["tail"])
    if action == ("POST", "purge"):
        return await _purge(request)
    if action == ("GET", "stats"):
        return _json_response(request, _process_stats(request.app))
    raise NotFound(f"no operator endpoint {request.method} /_edge/{request.match_info['tail']}")


async def _purge(request: web.Request) -> web.Response:
    raw = request.query.get("key")
    if not raw:
        raise InvalidParameter("key", "the object key to purge is required")
    key = parse_key("/" + quote(raw, safe="/"))
    prefix, purged = await request.app[SERVICE].purge(key)
    log.info("purged %d cached variants of %r", purged, key)
    broadcast = request.app.get(PURGE_LOG)
    if broadcast is not None:
        broadcast.publish(prefix)
    return _json_response(request, {"key": key, "purged": purged})


def _process_stats(app: web.Application) -> dict[str, int]:
    """What a soak run watches for leaks: tasks, threads, descriptors, memory, work."""
    admission = app[SERVICE].admission
    return {
        "asyncio_tasks": len(asyncio.all_tasks()),
        "threads": system.thread_count(),
        "open_fds": system.open_descriptors(),
        "rss_bytes": system.resident_bytes(),
        "transforms_in_progress": admission.in_use,
        "queue_depth": admission.waiting,
        "memory_reserved_bytes": admission.reserved,
        "background_tasks": len(app[STATE].background),
    }


def _json_response(request: web.Request, payload: Mapping[str, object]) -> web.Response:
    headers = _common_headers(request, request.app[SETTINGS])
    headers["Cache-Control"] = "no-store"
    headers["Content-Type"] = "application/json"
    return web.Response(body=json.dumps(payload).encode(), headers=headers)
