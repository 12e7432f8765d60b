"""Origins by key prefix (EDGE_ORIGINS_FILE): each behind its own timeout, headers and breaker.

``CircuitBreaker`` is a plain state machine on an injected clock::

    closed --(``failures`` counted failures in a row)--> open
    open --(``cooldown`` seconds later, the next request is the one probe)--> half-open
    half-open --(probe succeeds)--> closed      half-open --(probe fails)--> open again

While open, and while the probe is out, requests are refused at once with
OriginOverloaded (503, reason origin) whose Retry-After is the cooldown left (at least
1 s, at most 30 s). Only answers that say the origin is sick count as failures: 5xx
other than 503 and broken connections (OriginFailed), a 504 (OriginTimeout), and no
answer within the origin's own timeout (FetchTimeout raised here, or by the backend for
its connect timeout). Any other answer, a 404 or a 403 included, proves the origin is up
and resets the count. Some outcomes say nothing either way and leave the breaker as it
is: our own S3 credentials or clock refused (OriginMisconfigured: an operator's problem
that a 503 would only disguise), the origin's own 429/503 (already a 503 with its
Retry-After), a redirect refused by the SSRF guard, and a fetch cancelled because the
request's budget ran out or its client left (the budget is the request's, not the
origin's: set ``timeout`` below EDGE_BACKEND_TIMEOUT for stalls to count). A probe that
ends that way frees the probe slot for the next request.

``NamedOrigin`` wraps one backend with all of this; its ``identity`` carries the short
name, so two entries with the same URL never share cache entries.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

from edge.errors import (
    AddressRefused,
    EdgeError,
    FetchTimeout,
    OriginFailed,
    OriginMisconfigured,
    OriginOverloaded,
    OriginTimeout,
)
from edge.origins.base import Fetched, FetchOptions, Origin

Clock = Callable[[], float]

#: failures that open a circuit: the origin is sick (502/504 class)
COUNTED = (OriginFailed, OriginTimeout, FetchTimeout)
#: outcomes that say nothing about the origin's health
NEUTRAL = (OriginMisconfigured, OriginOverloaded, AddressRefused)


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to call the origin; hand it back with the outcome."""

    #: the breaker's generation when admitted: outcomes of older permits are ignored
    generation: int
    #: the one request let through to test a cooling-down origin
    probe: bool = False


class CircuitBreaker:
    """One origin's breaker. Not thread-safe: use it from the event loop only."""

    def __init__(
        self,
        name: str,
        *,
        failures: int = 5,
        cooldown: float = 30.0,
        clock: Clock = time.monotonic,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        if failures < 1 or cooldown <= 0:
            raise ValueError("a breaker needs failures >= 1 and cooldown > 0")
        self.name = name
        self.failures = failures
        self.cooldown = cooldown
        self.clock = clock
        #: called with True when the circuit opens and False when it closes
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._in_a_row = 0
        self._opened_at = 0.0
        self._probing = False
        self._generation = 0

    @property
    def state(self) -> BreakerState:
        """Open turns half-open once the cooldown has passed (the next request probes)."""
        if self._state is BreakerState.OPEN and self._cooled_down():
            return BreakerState.HALF_OPEN
        return self._state

    @property
    def probing(self) -> bool:
        """Whether the probe request is out."""
        return self._probing

    def admit(self) -> Permit:
        """A permit to call the origin, or OriginOverloaded while the circuit is open."""
        if self._state is BreakerState.CLOSED:
            return Permit(self._generation)
        if self._probing or not self._cooled_down():
            raise self._refusal()
        self._state = BreakerState.HALF_OPEN
        self._probing = True
        return Permit(self._generation, probe=True)

    def succeeded(self, permit: Permit) -> None:
        """The origin answered: a probe closes the circuit, else the count restarts."""
        if permit.generation != self._generation:
            return
        if permit.probe:
            self._close()
        elif self._state is BreakerState.CLOSED:
            self._in_a_row = 0

    def failed(self, permit: Permit) -> None:
        """The origin is sick: a probe re-opens the circuit, else the count goes up."""
        if permit.generation != self._generation:
            return
        if permit.probe:
            self._open()
        elif self._state is BreakerState.CLOSED:
            self._in_a_row += 1
            if self._in_a_row >= self.failures:
                self._open()

    def released(self, permit: Permit) -> None:
        """The call ended saying nothing about the origin; a probe's slot is freed."""
        if permit.generation == self._generation and permit.probe:
            self._probing = False

    def retry_after(self) -> int:
        """Whole seconds until a probe may go, at least 1 (Overloaded caps it at 30)."""
        left = self._opened_at + self.cooldown - self.clock()
        return max(1, math.ceil(left))

    def _cooled_down(self) -> bool:
        return self.clock() >= self._opened_at + self.cooldown

    def _refusal(self) -> OriginOverloaded:
        waiting = "a probe request is out" if self._probing else "cooling down"
        return OriginOverloaded(
            "the origin is failing; its circuit breaker is open",
            retry_after=self.retry_after(),
            detail=f"origin {self.name!r}: circuit open ({waiting})",
        )

    def _open(self) -> None:
        was_closed = self._state is BreakerState.CLOSED
        self._state = BreakerState.OPEN
        self._opened_at = self.clock()
        self._probing = False
        self._in_a_row = 0
        self._generation += 1
        if was_closed and self._on_change is not None:
            self._on_change(True)

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self._probing = False
        self._in_a_row = 0
        self._generation += 1
        if self._on_change is not None:
            self._on_change(False)


class NamedOrigin:
    """A backend serving the keys under one prefix, with its own timeout, headers and breaker.

    ``fetch`` takes the key with the prefix already stripped (``Origins.route`` does it).
    """

    def __init__(
        self,
        name: str,
        prefix: str,
        inner: Origin,
        breaker: CircuitBreaker,
        *,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.prefix = prefix
        self.inner = inner
        self.breaker = breaker
        self.timeout = timeout
        self.headers = dict(headers or {})
        self.kind = inner.kind

    @property
    def identity(self) -> str:
        return f"{self.name}@{self.inner.identity}"

    def sharing(self, inner: Origin) -> NamedOrigin:
        """The same name, prefix, timeout, headers and breaker in front of another backend
        (a ``bucket=`` override of this origin's S3 client)."""
        return NamedOrigin(
            self.name,
            self.prefix,
            inner,
            self.breaker,
            timeout=self.timeout,
            headers=self.headers,
        )

    async def close(self) -> None:
        await self.inner.close()

    async def fetch(self, key: str, options: FetchOptions) -> Fetched:
        permit = self.breaker.admit()  # before any await: a probe is taken at once
        try:
            fetched = await self._fetch(key, self._options(options))
        except COUNTED:
            self.breaker.failed(permit)
            raise
        except NEUTRAL:
            self.breaker.released(permit)
            raise
        except EdgeError:
            self.breaker.succeeded(permit)  # it answered (404, 403, 400, too large...): it is up
            raise
        except BaseException:
            self.breaker.released(permit)  # cancelled (budget or client) or a bug of ours
            raise
        self.breaker.succeeded(permit)
        return fetched

    def _options(self, options: FetchOptions) -> FetchOptions:
        """Static headers under the request's own; the connect timeout within ours."""
        connect = options.connect_timeout
        if self.timeout is not None:
            connect = min(connect, self.timeout)
        if not self.headers and connect == options.connect_timeout:
            return options
        return replace(
            options, headers={**self.headers, **options.headers}, connect_timeout=connect
        )

    async def _fetch(self, key: str, options: FetchOptions) -> Fetched:
        if self.timeout is None:
            return await self.inner.fetch(key, options)
        try:
            async with asyncio.timeout(self.timeout):
                return await self.inner.fetch(key, options)
        except TimeoutError as exc:
            raise FetchTimeout(
                "the origin did not answer within its timeout",
                detail=f"origin {self.name!r}: timeout {self.timeout:g} s, key {key!r}",
            ) from exc
