"""Optional OpenTelemetry tracing: a span per request and per stage, traceparent honoured.

Installed with the ``otel`` extra (``pip install edge[otel]``) and configured only by the
standard OTEL_* variables: tracing is on when OTEL_TRACES_EXPORTER or an OTLP endpoint is
set and OTEL_SDK_DISABLED is not true. Otherwise ``from_environ`` returns None, edge
imports nothing from opentelemetry, and every hook costs one ``is None`` check. (Some
libraries, redis-py among them, import opentelemetry on their own when it is installed.)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any

_ENABLING = (
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
)


class Tracing:
    """A tracer plus the propagator: what the middleware and the pipeline call."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import propagate, trace

        self._provider = provider
        self._tracer = provider.get_tracer("edge")
        self._propagate = propagate
        self._trace = trace

    @classmethod
    def with_exporter(cls, exporter: Any) -> Tracing:
        """Tracing into ``exporter`` synchronously (tests use an in-memory one)."""
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        return cls(provider)

    @contextmanager
    def request_span(self, name: str, headers: Mapping[str, str]) -> Iterator[Any]:
        """The request's span, a child of the caller's ``traceparent`` when it sent one."""
        parent = self._propagate.extract(dict(headers))
        kind = self._trace.SpanKind.SERVER
        with self._tracer.start_as_current_span(name, context=parent, kind=kind) as span:
            yield span

    def stage_span(self, stage: str) -> AbstractContextManager[Any]:
        span: AbstractContextManager[Any] = self._tracer.start_as_current_span(stage)
        return span

    def inject(self, carrier: MutableMapping[str, str]) -> None:
        """Add traceparent (and tracestate) for the current span to outgoing headers."""
        self._propagate.inject(carrier)

    def shutdown(self) -> None:
        self._provider.shutdown()


def from_environ(environ: Mapping[str, str]) -> Tracing | None:
    """Tracing as the OTEL_* variables configure it, or None (off or not installed)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if not any(environ.get(name) for name in _ENABLING):
        return None
    if not _installed("opentelemetry.sdk"):
        return None
    return Tracing(_provider_from(environ))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing or blocked
        return False


def _provider_from(environ: Mapping[str, str]) -> Any:
    """A provider with the exporter OTEL_TRACES_EXPORTER names (otlp by default)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win; "edge" only fills a blank name.
    named = environ.get("OTEL_SERVICE_NAME") or "service.name" in environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    provider = TracerProvider(resource=Resource.create({} if named else {"service.name": "edge"}))
    for name in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(","):
        exporter = name.strip().lower()
        if exporter == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        elif exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            # OTLPSpanExporter reads its endpoint, headers and timeout from OTEL_* itself.
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider
