"""The request pipeline, free of any HTTP server: Incoming -> Reply, or an EdgeError.

Data flows one way: key and parameters -> cache -> origin (fetch, holding no transform
slot) -> header probe -> admission (slot + memory reservation) -> imaging (in a worker
thread, killable) -> reply, with the cache write left for after the response is sent.
Every stage spends the request's one Deadline; a stage that outlives it raises the
contract's class for that stage (FetchTimeout, QueueTimeout, TransformTimeout).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from edge import imaging
from edge.admission import Admission
from edge.budget import Deadline, KillSwitch
from edge.cache import Entry, Flight, FlightTimeout, ResultCache, SingleFlight
from edge.errors import (
    BadGateway,
    ClientClosed,
    EdgeError,
    FetchTimeout,
    Forbidden,
    FormatNotAllowed,
    NotFound,
    OriginalRequestsDisabled,
    Overloaded,
    QueueTimeout,
    Timeout,
    TransformTimeout,
    Unauthorized,
    UndecodableImage,
)
from edge.metrics import Metrics
from edge.origins import Fetched, FetchOptions, Origin, Origins
from edge.params import (
    ImageRequest,
    OutputFormat,
    ParamPolicy,
    ReqType,
    TransformSpec,
    accepted_formats,
    apply_client_hints,
    lenient_req,
    parse_key,
    parse_query,
)
from edge.responses import (
    Body,
    PropValue,
    derived_etag,
    etag_matches,
    props_body,
    surrogate_tag,
)
from edge.settings import Settings
from edge.signing import verify
from edge.tracing import Tracing

log = logging.getLogger("edge")

#: seconds a default or error image may take, apart from the failed request's budget
STAND_IN_BUDGET = 3.0
#: distinct query strings whose parse is remembered
PARSED_QUERIES = 4096
#: distinct (URL, negotiation headers) whose target is remembered
REMEMBERED_TARGETS = 4096
#: longest URL plus headers (or query, for the parse) remembered, in characters
REMEMBERED_CHARS = 2048
#: share of the remaining budget spent waiting for another process's fill of a cold key
FILL_LOCK_SHARE = 0.5
#: side of a generated error image when the request named no size
ERROR_IMAGE_SIDE = 300

SNIFFED_TYPES = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "avif": "image/avif",
    "heif": "image/heif",
    "tiff": "image/tiff",
}


@dataclass
class Incoming:
    """One request as the pipeline sees it (built by the HTTP layer)."""

    raw_path: str
    #: the query string exactly as received (signatures cover these bytes)
    raw_query: str
    #: the decoded query parameters, asked for only when the target is not remembered
    read_query: Callable[[], Sequence[tuple[str, str]]]
    headers: Mapping[str, str]
    request_id: str
    deadline: Deadline
    #: filled in as the pipeline learns them (stand-in images need them)
    key: str | None = None
    request: ImageRequest | None = None
    #: set once the request is verified, parsed and routed
    target: Target | None = None

    @functools.cached_property
    def query(self) -> Sequence[tuple[str, str]]:
        return self.read_query()


@dataclass(frozen=True, slots=True)
class Target:
    """What a request names, worked out from its URL and negotiation headers alone."""

    #: the object key as the URL names it (before an origin prefix is stripped)
    key: str
    #: the parsed request, client hints applied
    request: ImageRequest
    #: the hint headers that shaped it (for Vary)
    hints: tuple[str, ...]
    accepted: frozenset[OutputFormat]
    #: where an image request's result is cached (None: not a cached request type)
    cache_key: str | None
    #: Surrogate-Key / Cache-Tag of every variant of the object
    tag: str


@dataclass(slots=True)
class _Remembered:
    """A target as remembered, with the headers of its last unconditional hit.

    The hit is known by what its headers are made of, not by its entry: holding the entry
    would keep its body alive after the memory tier dropped it.
    """

    target: Target
    #: what the headers are made of (the entry's time, validators, type and Vary)
    hit_stamp: tuple[float, str | None, str | None, str, str | None] | None = None
    hit_headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Reply:
    """What to send: the HTTP layer adds the headers every response carries."""

    status: int
    body: bytes
    headers: dict[str, str]
    outcome: str = "ok"
    #: response-bytes metric label: an output format, or "other"
    format_label: str = "other"
    #: X-Edge-Cache value, when the request went through the cache
    cache: str | None = None
    #: work to run once the response has been sent (cache writes)
    after: Callable[[], Awaitable[None]] | None = None
    #: errors carried by a substitute image (error/default image) keep their outcome
    error: EdgeError | None = field(default=None)
    #: the headers are shared with other replies (the hits on one entry): read-only
    shared: bool = False


@dataclass(frozen=True, slots=True)
class Rendered:
    """A finished image and the validators its response carries."""

    body: bytes
    format: OutputFormat
    width: int
    height: int
    quality: int | None
    etag: str | None
    last_modified: str | None
    vary_accept: bool
    origin_etag: str | None = None


class Service:
    """Owns the pipeline's collaborators; one per worker process."""

    def __init__(
        self,
        settings: Settings,
        *,
        origins: Origins,
        cache: ResultCache,
        admission: Admission,
        pool: concurrent.futures.Executor,
        metrics: Metrics,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.tracing = tracing
        self.origins = origins
        self.cache = cache
        self.flights = SingleFlight(metrics)
        self.admission = admission
        self.pool = pool
        self.metrics = metrics
        self.policy = ParamPolicy.from_settings(settings)
        self._cache_control = f"public, max-age={settings.http_max_age}"
        # Parsing is pure and hot (every hit): the same query string is parsed once.
        self._parse = functools.lru_cache(maxsize=PARSED_QUERIES)(self._parse_query)
        self._targets: dict[tuple[str, str, str | None, str | None, str | None], _Remembered] = {}
        #: EDGE_ERROR_IMAGE's bytes when it names an origin key (see load_error_image)
        self._error_image_bytes: bytes | None = None
        self.limits = imaging.Limits(
            allowed_formats=settings.allowed_input_formats,
            max_source_pixels=settings.max_source_pixels,
            max_animation_frames=settings.max_animation_frames,
            max_output_dimension=settings.max_output_dimension,
            max_output_pixels=settings.max_output_pixels,
        )

    def _parse_query(self, pairs: tuple[tuple[str, str], ...]) -> ImageRequest:
        return parse_query(pairs, self.policy)

    async def handle(self, incoming: Incoming) -> Reply:
        """The reply for one request; failures raise, unless an image stands in for them."""
        try:
            reply = await self._handle(incoming)
        except (ClientClosed, Overloaded):
            raise  # never substituted: the client is gone, or it should retry
        except EdgeError as error:
            stand_in = await self._stand_in(error, incoming)
            if stand_in is None:
                raise
            return stand_in
        if incoming.target is not None:
            _tag(reply, incoming.target)
        return reply

    def remembered_hit(
        self, raw_path: str, raw_query: str, headers: Mapping[str, str], deadline: Deadline
    ) -> Reply | None:
        """The reply to a URL already worked out whose image is fresh in the memory tier
        in front, found without awaiting anything; None for every other request.

        The HTTP layer asks this before routing. A None costs a dictionary look-up or two
        and counts nothing: ``handle`` then serves the request and counts what it finds.
        The headers of an unconditional hit are shared by every hit on the same entry
        (``Reply.shared``): read them, never change them.
        """
        remembered = self._targets.get(_memo_key(raw_path, raw_query, headers))
        if remembered is None:
            return None
        target = remembered.target
        if target.cache_key is None:
            return None
        entry = self.cache.fresh_in_memory(target.cache_key, deadline)
        if entry is None:
            return None
        if "If-None-Match" in headers:  # the answer depends on the request: not shared
            return _tag(self._entry_reply(entry, headers, target.hints, "hit"), target)
        stamp = (entry.created, entry.etag, entry.last_modified, entry.content_type, entry.vary)
        if remembered.hit_stamp != stamp:
            reply = _tag(self._entry_reply(entry, {}, target.hints, "hit"), target)
            remembered.hit_headers, remembered.hit_stamp = reply.headers, stamp
        label = entry.content_type.removeprefix("image/")
        headers = remembered.hit_headers
        return Reply(200, entry.body, headers, format_label=label, cache="hit", shared=True)

    async def purge(self, key: str) -> tuple[str, int]:
        """Drop every cached variant of ``key`` (routed like a request) from every tier
        this process reaches; the variants' key prefix and how many were dropped."""
        origin, routed = self.origins.route(key, None, None)
        prefix = self.cache.object_prefix(origin.identity, routed)
        return prefix, await self.cache.purge(prefix)

    def _target(self, incoming: Incoming) -> Target:
        """What the request names: remembered per URL and negotiation headers, so a hot
        URL is verified, parsed, routed and keyed once rather than on every hit."""
        memo_key = _memo_key(incoming.raw_path, incoming.raw_query, incoming.headers)
        remembered = self._targets.get(memo_key)
        if remembered is not None:
            target = remembered.target
        else:
            target = self._work_out_target(incoming, memo_key[2], memo_key[3], memo_key[4])
            # long URLs or headers are worked out each time: the memo's memory stays small
            if sum(len(part) for part in memo_key if part) <= REMEMBERED_CHARS:
                if len(self._targets) >= REMEMBERED_TARGETS:
                    del self._targets[next(iter(self._targets))]  # the oldest goes first
                self._targets[memo_key] = _Remembered(target)
        incoming.key, incoming.request, incoming.target = target.key, target.request, target
        return target

    def _work_out_target(
        self, incoming: Incoming, accept: str | None, dpr: str | None, width: str | None
    ) -> Target:
        """Verify, parse, route and key a request (the same inputs give the same target).
        What it learns goes into ``incoming`` as it goes, for stand-in images."""
        if self.settings.signing_keys:
            # Checked first: an unsigned request learns nothing, not even a 400.
            verify(incoming.raw_path, incoming.raw_query, self.settings.signing_keys)
        key = incoming.key = parse_key(incoming.raw_path)
        pairs = tuple(incoming.query)
        short = len(incoming.raw_query) <= REMEMBERED_CHARS
        request = incoming.request = (self._parse if short else self._parse_query)(pairs)
        origin, routed = self.origins.route(key, request.origin, request.bucket)
        request, hints = apply_client_hints(
            request,
            dpr,
            width,
            self.settings.max_output_dimension,
            self.settings.max_output_pixels,
        )
        accepted = accepted_formats(accept)
        cache_key = None
        if request.req is ReqType.IMG and not request.is_original:
            token = _output_token(request.spec, accepted)
            cache_key = self.cache.key(origin.identity, routed, request.canonical(), token)
        return Target(
            key=key,
            request=request,
            hints=hints,
            accepted=accepted,
            cache_key=cache_key,
            tag=surrogate_tag(origin.identity, key),
        )

    async def _handle(self, incoming: Incoming) -> Reply:
        target = self._target(incoming)
        request = target.request
        if request.backend_timeout is not None:
            incoming.deadline.shorten_to(request.backend_timeout)
        if target.cache_key is not None:
            return await self._cached_image(target, target.cache_key, incoming)
        origin, key = self._origin_of(target)
        if request.is_original:
            return await self._original(origin, key, incoming)
        if request.req is ReqType.EXISTS:
            return await self._exists(origin, key, request, incoming)
        if request.req is ReqType.IMAGEPROPS:
            return await self._image_props(origin, key, request, incoming)
        rendered = await self._render(
            origin, key, request, target.accepted, incoming.deadline, incoming.request_id
        )
        return self._props_reply(rendered, request)

    def _origin_of(self, target: Target) -> tuple[Origin, str]:
        """The origin to fetch from and the key to ask it for (routed afresh: dynamic
        origins are pooled and may have been retired since the target was remembered)."""
        return self.origins.route(target.key, target.request.origin, target.request.bucket)

    # --- the cache, coalescing and stale serving -------------------------------------------

    async def _cached_image(self, target: Target, cache_key: str, incoming: Incoming) -> Reply:
        hints = target.hints
        lookup = await self.cache.get(cache_key, deadline=incoming.deadline)
        if lookup is not None and lookup.fresh:
            if lookup.entry.status == 404:
                raise NotFound(
                    "no such image", detail=f"key {target.key!r} (remembered as missing)"
                )
            return self._entry_reply(lookup.entry, incoming.headers, hints, "hit")
        origin, key = self._origin_of(target)
        try:
            if lookup is not None and lookup.entry.status == 200:
                renewed = await self._revalidate(origin, key, cache_key, lookup.entry, incoming)
                if renewed is not None:
                    reply = self._entry_reply(renewed, incoming.headers, hints, "hit")
                    reply.after = Produced(renewed, {}, self.cache, cache_key).store
                    return reply
            if cache_key not in self.flights:  # joining work in flight costs nothing
                self.admission.shed_if_full()
            produced = await self._produce(
                cache_key, origin, key, target.request, target.accepted, incoming
            )
        except (BadGateway, Timeout, Overloaded) as failure:
            if lookup is None or lookup.entry.status != 200:
                raise
            # The origin or the machine is sick: yesterday's image beats an error.
            log.info("serving a stale entry after %s (%s)", failure.outcome, failure.reason)
            return self._entry_reply(lookup.entry, incoming.headers, hints, "stale")
        incoming.deadline.spent.update(produced.spent)
        reply = self._entry_reply(produced.entry, incoming.headers, hints, "miss")
        reply.after = produced.store
        return reply

    async def _revalidate(
        self, origin: Origin, key: str, cache_key: str, entry: Entry, incoming: Incoming
    ) -> Entry | None:
        """Ask the origin whether a stale entry's original changed (DESIGN.md section 8).

        Unchanged: the entry, renewed from now, with no transform. Changed (or nothing
        to compare with): None, and the caller renders afresh. Gone or refused: evicted.
        """
        if not (entry.origin_etag or entry.last_modified):
            return None
        try:
            fetched = await self._fetch(
                origin,
                key,
                incoming.deadline,
                incoming.request_id,
                stage="revalidate",
                if_none_match=entry.origin_etag,
                if_modified_since=None if entry.origin_etag else entry.last_modified,
            )
        except (NotFound, Unauthorized, Forbidden) as refused:
            await self.cache.delete(cache_key)
            if isinstance(refused, NotFound):
                await self._remember_missing(cache_key)
            raise
        if not fetched.not_modified:
            return None
        return replace(entry, created=self.cache.now())

    async def _produce(
        self,
        cache_key: str,
        origin: Origin,
        key: str,
        request: ImageRequest,
        accepted: frozenset[OutputFormat],
        incoming: Incoming,
    ) -> Produced:
        """One render for every identical miss in flight here (and, with a shared Redis
        tier, across processes)."""

        async def work(flight: Flight) -> Produced:
            wait = flight.deadline.remaining() * FILL_LOCK_SHARE
            async with self.cache.fill_lock(cache_key, wait=wait) as fill:
                if fill.lookup is not None:  # another process stored it while we waited
                    return Produced(fill.lookup.entry, dict(flight.deadline.spent))
                try:
                    rendered = await self._render(
                        origin,
                        key,
                        request,
                        accepted,
                        flight.deadline,
                        incoming.request_id,
                        kill=flight,
                    )
                except (NotFound, Unauthorized, Forbidden) as refused:
                    # The object is gone or ours no more: a stale copy must not outlive it.
                    await self.cache.delete(cache_key)
                    if isinstance(refused, NotFound):
                        await self._remember_missing(cache_key)
                    raise
                entry = _entry_of(rendered, created=self.cache.now())
                produced = Produced(entry, dict(flight.deadline.spent), self.cache, cache_key)
                if fill.acquired:
                    # Other processes wait on this lock for the entry: store it first.
                    await produced.store()
                return produced

        try:
            return await self.flights.run(cache_key, incoming.deadline, work)
        except FlightTimeout as late:
            raise _timeout_in(late.stage) from None

    async def _remember_missing(self, cache_key: str) -> None:
        """A short negative entry (memory tier only), so a missing key costs one fetch."""
        if self.settings.error_max_age > 0:
            missing = Entry(
                body=b"",
                content_type="text/plain",
                etag=None,
                last_modified=None,
                created=self.cache.now(),
                status=404,
                error="not_found",
            )
            await self.cache.set_negative(cache_key, missing, self.settings.error_max_age)

    def _entry_reply(
        self, entry: Entry, headers: Mapping[str, str], hints: Sequence[str], state: str
    ) -> Reply:
        sent = self._success_headers(entry.etag, entry.last_modified)
        if entry.vary or hints:
            sent["Vary"] = ", ".join((entry.vary, *hints) if entry.vary else hints)
        if etag_matches(headers.get("If-None-Match"), entry.etag):
            return Reply(304, b"", sent, outcome="not_modified", cache=state)
        sent["Content-Type"] = entry.content_type
        label = entry.content_type.removeprefix("image/")
        return Reply(200, entry.body, sent, format_label=label, cache=state)

    # --- stages ---------------------------------------------------------------------------

    async def _fetch(
        self,
        origin: Origin,
        key: str,
        deadline: Deadline,
        request_id: str,
        *,
        stage: str = "fetch",
        if_none_match: str | None = None,
        if_modified_since: str | None = None,
    ) -> Fetched:
        options = FetchOptions(
            max_bytes=self.settings.max_source_bytes,
            request_id=request_id,
            connect_timeout=min(self.settings.backend_connect_timeout, deadline.remaining()),
            if_none_match=if_none_match,
            if_modified_since=if_modified_since,
        )
        with deadline.stage(stage):
            if self.tracing is not None:
                self.tracing.inject(options.headers)  # the origin joins the caller's trace
            try:
                async with deadline.timeout():
                    return await origin.fetch(key, options)
            except TimeoutError as exc:
                raise FetchTimeout(
                    "the time budget ran out while fetching the original",
                    detail=f"key {key!r}",
                ) from exc

    async def _probe(self, data: bytes, deadline: Deadline) -> imaging.SourceInfo:
        # Header parsing can touch the whole file (GIF frame counts): off the event loop,
        # and bounded by the budget (the thread cannot be killed, but we stop waiting).
        probing = asyncio.ensure_future(asyncio.to_thread(imaging.probe, data, self.limits))
        try:
            async with deadline.timeout():
                return await asyncio.shield(probing)
        except TimeoutError:
            probing.add_done_callback(lambda done: done.cancelled() or done.exception())
            raise TransformTimeout("the time budget ran out reading the image header") from None

    async def _render(
        self,
        origin: Origin,
        key: str,
        request: ImageRequest,
        accepted: frozenset[OutputFormat],
        deadline: Deadline,
        request_id: str,
        *,
        kill: KillSwitch | None = None,
    ) -> Rendered:
        fetched = await self._fetch(origin, key, deadline, request_id)
        output, plan = await self._image(fetched.data, request.spec, accepted, deadline, kill)
        return Rendered(
            body=output.body,
            format=output.format,
            width=output.width,
            height=output.height,
            quality=output.quality,
            etag=derived_etag(
                fetched.etag or fetched.last_modified, request.canonical(), output.format.value
            ),
            last_modified=fetched.last_modified,
            vary_accept=plan.vary_accept,
            origin_etag=fetched.etag,
        )

    async def _image(
        self,
        data: bytes,
        spec: TransformSpec,
        accepted: frozenset[OutputFormat],
        deadline: Deadline,
        kill: KillSwitch | None = None,
    ) -> tuple[imaging.Output, imaging.Plan]:
        """Probe, plan, admit and transform ``data`` as ``spec`` asks."""
        info = await self._probe(data, deadline)
        plan = imaging.plan(
            info,
            spec,
            accepted=accepted,
            default_quality=self.settings.default_quality,
            limits=self.limits,
        )
        return await self._transform(data, info, plan, spec, deadline, kill or KillSwitch()), plan

    async def _transform(
        self,
        data: bytes,
        info: imaging.SourceInfo,
        plan: imaging.Plan,
        spec: TransformSpec,
        deadline: Deadline,
        kill: KillSwitch,
    ) -> imaging.Output:
        with deadline.stage("queue"):
            ticket = await self.admission.admit(plan.memory_estimate, deadline, held=len(data))
        with deadline.stage("transform"):
            future = asyncio.get_running_loop().run_in_executor(
                self.pool, imaging.transform, data, info, plan, spec, kill
            )
            # The slot is free only when the thread is: a killed pipeline keeps it until
            # libvips has actually stopped, so the pool never runs more than the slots.
            future.add_done_callback(lambda done: _settle(done, ticket.release))
            try:
                async with deadline.timeout():
                    return await asyncio.shield(future)
            except TimeoutError:
                kill.kill("timeout")
                raise TransformTimeout(
                    "the time budget ran out while transforming", detail=f"plan {plan}"
                ) from None
            except asyncio.CancelledError:
                kill.kill("client_closed")
                raise

    # --- images standing in for failures (Scene7 default and error images) ----------------

    async def load_error_image(self) -> None:
        """Read an EDGE_ERROR_IMAGE origin key once at start; a missing one stops start-up."""
        name = self.settings.error_image
        if name and name != "generated":
            deadline = Deadline.after(self.settings.backend_timeout)
            origin, routed = self.origins.route(name, None, None)
            fetched = await self._fetch(origin, routed, deadline, "startup")
            await self._probe(fetched.data, deadline)  # unreadable: a start-up error too
            self._error_image_bytes = fetched.data

    async def _stand_in(self, error: EdgeError, incoming: Incoming) -> Reply | None:
        """A default or error image answering for ``error`` with 200, or None."""
        request = incoming.request
        if _asks_for_properties(incoming):
            return None  # property requests answer errors in their own format
        spec = self._stand_in_spec(incoming)
        # The failed request may have spent its budget: a stand-in gets a short one of its own.
        deadline = Deadline.after(min(self.settings.backend_timeout, STAND_IN_BUDGET))
        default_key = self._default_image_key(request)
        try:
            if isinstance(error, NotFound) and default_key and incoming.key != default_key:
                return await self._default_image(default_key, error, spec, incoming, deadline)
            if self.settings.error_image:
                return await self._error_image(error, spec, incoming, deadline)
        except EdgeError as failure:
            log.info("stand-in image failed (%s); sending the plain error", failure.reason)
        return None

    def _default_image_key(self, request: ImageRequest | None) -> str | None:
        if request is not None and request.default_image is not None:
            return request.default_image or None  # defaultImage= (empty) disables it
        return self.settings.default_image

    def _stand_in_spec(self, incoming: Incoming) -> TransformSpec:
        """The request's size, format and quality only (Scene7 DefaultImageMode 0)."""
        spec = incoming.request.spec if incoming.request else self._lenient_spec(incoming)
        return TransformSpec(
            width=spec.width,
            height=spec.height,
            dpr=spec.dpr,
            format=spec.format,
            auto_format=spec.auto_format,
            quality=spec.quality,
        )

    def _lenient_spec(self, incoming: Incoming) -> TransformSpec:
        """Whatever size and format parameters parse on their own, when the query did not."""
        fields: dict[str, object] = {}
        for name, value in incoming.query:
            try:
                parsed = parse_query([(name, value)], self.policy).spec
            except EdgeError:
                continue
            for field_name in ("width", "height", "dpr", "format", "auto_format", "quality"):
                if getattr(parsed, field_name) != getattr(TransformSpec(), field_name):
                    fields[field_name] = getattr(parsed, field_name)
        return replace(TransformSpec(), **fields)  # type: ignore[arg-type]

    async def _default_image(
        self,
        default_key: str,
        error: EdgeError,
        spec: TransformSpec,
        incoming: Incoming,
        deadline: Deadline,
    ) -> Reply:
        if incoming.target is not None:
            # the request's own origin/bucket, with the default key routed like any key
            request = incoming.target.request
            origin, routed = self.origins.route(default_key, request.origin, request.bucket)
        else:
            origin, routed = self.origins.route(default_key, None, None)
        fetched = await self._fetch(origin, routed, deadline, incoming.request_id)
        accepted = accepted_formats(incoming.headers.get("Accept"))
        output, _ = await self._image(fetched.data, spec, accepted, deadline)
        return self._stand_in_reply(error, output.body, output.format)

    async def _error_image(
        self, error: EdgeError, spec: TransformSpec, incoming: Incoming, deadline: Deadline
    ) -> Reply:
        accepted = accepted_formats(incoming.headers.get("Accept"))
        if self._error_image_bytes is not None:
            output, _ = await self._image(self._error_image_bytes, spec, accepted, deadline)
            return self._stand_in_reply(error, output.body, output.format)
        fmt = spec.format or _negotiated(accepted, auto=spec.auto_format) or OutputFormat.PNG
        width, height = self._error_image_size(spec)
        body = await asyncio.to_thread(
            imaging.render_error_image, error.title, error.reason, width, height, fmt, spec.quality
        )
        return self._stand_in_reply(error, body, fmt)

    def _error_image_size(self, spec: TransformSpec) -> tuple[int, int]:
        width = spec.width or spec.height or ERROR_IMAGE_SIDE
        height = spec.height or spec.width or ERROR_IMAGE_SIDE
        cap = self.settings.max_output_dimension
        return min(round(width * spec.dpr), cap), min(round(height * spec.dpr), cap)

    def _stand_in_reply(self, error: EdgeError, body: bytes, fmt: OutputFormat) -> Reply:
        max_age = self.settings.error_max_age
        cache_control = (
            f"public, max-age={max_age}" if error.cacheable and max_age > 0 else "no-store"
        )
        headers = {
            "Content-Type": fmt.content_type,
            "X-Edge-Error": error.outcome,
            "Cache-Control": cache_control,
        }
        return Reply(200, body, headers, outcome=error.outcome, format_label=fmt.value, error=error)

    # --- replies --------------------------------------------------------------------------

    def _props_reply(self, rendered: Rendered, request: ImageRequest) -> Reply:
        body = props_body(
            {
                "image.width": rendered.width,
                "image.height": rendered.height,
                "image.format": rendered.format.value,
                "image.bytes": len(rendered.body),
                "image.quality": rendered.quality or 0,
            },
            request.req_format,
        )
        return self._body_reply(body)

    def _body_reply(self, body: Body) -> Reply:
        headers = self._success_headers(None, None)
        headers["Content-Type"] = body.content_type
        return Reply(200, body.data, headers)

    def _success_headers(self, etag: str | None, last_modified: str | None) -> dict[str, str]:
        headers = {"Cache-Control": self._cache_control}
        if etag:
            headers["ETag"] = etag
        if last_modified:
            headers["Last-Modified"] = last_modified
        return headers

    async def _original(self, origin: Origin, key: str, incoming: Incoming) -> Reply:
        if not self.settings.allow_original_image_request:
            raise OriginalRequestsDisabled("requests for the original image are disabled")
        fetched = await self._fetch(origin, key, incoming.deadline, incoming.request_id)
        sniffed = imaging.sniff(fetched.data)
        if sniffed is None:
            raise UndecodableImage("the original is not an image edge can read")
        if sniffed not in self.settings.allowed_input_formats:
            raise FormatNotAllowed(f"{sniffed} originals are not allowed on this service")
        if sniffed == "svg":
            # Never passed through: rasterised at its own size by the whole pipeline, so
            # admission, the output limits and the kill switch apply as for any transform.
            spec = TransformSpec(format=OutputFormat.PNG)
            output, _ = await self._image(fetched.data, spec, frozenset(), incoming.deadline)
            headers = self._success_headers(None, fetched.last_modified)
            headers["Content-Type"] = output.format.content_type
            return Reply(200, output.body, headers, format_label="png", cache="miss")
        headers = self._success_headers(fetched.etag, fetched.last_modified)
        if etag_matches(incoming.headers.get("If-None-Match"), fetched.etag):
            return Reply(304, b"", headers, outcome="not_modified")
        headers["Content-Type"] = SNIFFED_TYPES[sniffed]
        label = sniffed if sniffed in ("jpeg", "png", "webp", "gif", "avif") else "other"
        return Reply(200, fetched.data, headers, format_label=label)

    async def _exists(
        self, origin: Origin, key: str, request: ImageRequest, incoming: Incoming
    ) -> Reply:
        try:
            await self._fetch(origin, key, incoming.deadline, incoming.request_id)
            exists = 1
        except NotFound:
            exists = 0
        return self._body_reply(props_body({"catalogRecord.exists": exists}, request.req_format))

    async def _image_props(
        self, origin: Origin, key: str, request: ImageRequest, incoming: Incoming
    ) -> Reply:
        fetched = await self._fetch(origin, key, incoming.deadline, incoming.request_id)
        info = await self._probe(fetched.data, incoming.deadline)
        props: dict[str, PropValue] = {
            "image.width": info.upright_width,
            "image.height": info.upright_height,
            "image.format": info.format,
            "image.bytes": len(fetched.data),
            "image.pages": info.pages,
            "image.orientation": info.orientation,
            "image.hasAlpha": info.has_alpha,
        }
        return self._body_reply(props_body(props, request.req_format))


@dataclass
class Produced:
    """A freshly made (or another process's) entry, stored at most once, after sending."""

    entry: Entry
    #: the shared work's stage timings, for each waiter's Server-Timing and histograms
    spent: dict[str, float]
    cache: ResultCache | None = None
    key: str = ""
    stored: bool = False

    async def store(self) -> None:
        if self.cache is not None and not self.stored:
            self.stored = True
            await self.cache.set(self.key, self.entry)


def _asks_for_properties(incoming: Incoming) -> bool:
    """Whether the request is a ``req=`` other than img, read leniently when its query
    did not parse (its error must still come in the property format)."""
    if incoming.request is not None:
        return incoming.request.req is not ReqType.IMG
    kind, _ = lenient_req(incoming.query)
    return kind != ReqType.IMG.value


def _memo_key(
    raw_path: str, raw_query: str, headers: Mapping[str, str]
) -> tuple[str, str, str | None, str | None, str | None]:
    """What a target is remembered under: the URL as received and the headers that
    negotiate the variant (Accept for the format, the client hints for the size)."""
    return (
        raw_path,
        raw_query,
        headers.get("Accept"),
        headers.get("Sec-CH-DPR"),
        headers.get("Sec-CH-Width"),
    )


def _tag(reply: Reply, target: Target) -> Reply:
    """Label ``reply`` with its object's tag: a CDN in front can then drop every variant
    of the object with one tag purge."""
    reply.headers["Surrogate-Key"] = reply.headers["Cache-Tag"] = target.tag
    return reply


def _entry_of(rendered: Rendered, *, created: float) -> Entry:
    return Entry(
        body=rendered.body,
        content_type=rendered.format.content_type,
        etag=rendered.etag,
        last_modified=rendered.last_modified,
        created=created,
        vary="Accept" if rendered.vary_accept else None,
        origin_etag=rendered.origin_etag,
    )


def _output_token(spec: TransformSpec, accepted: frozenset[OutputFormat]) -> str:
    """The part of the output format known before the source is: part of the cache key."""
    if spec.format is not None:
        return spec.format.value
    if spec.auto_format:
        return "auto:" + (_negotiated(accepted, auto=True) or "fallback")
    return "source"


def _timeout_in(stage: str | None) -> EdgeError:
    """What a waiter whose own deadline passed answers, by the stage the work was in."""
    if stage == "queue":
        return QueueTimeout("the budget ended while waiting for a transform slot")
    if stage == "transform":
        return TransformTimeout("the time budget ran out while transforming")
    return FetchTimeout("the time budget ran out while fetching the original")


def _negotiated(accepted: frozenset[OutputFormat], *, auto: bool) -> OutputFormat | None:
    preferred = (OutputFormat.AVIF, OutputFormat.WEBP) if auto else ()
    return next((fmt for fmt in preferred if fmt in accepted), None)


def _settle(done: asyncio.Future[imaging.Output], release: Callable[[], None]) -> None:
    """Free the slot and consume an abandoned transform's result or error."""
    release()
    if not done.cancelled():
        done.exception()
