"""OpenTelemetry spans of a request's journey (``--otlp-traces-endpoint``, vLLM's flag).

Optional: without the flag nothing here imports OpenTelemetry. With it, the
router opens a span per call and sends its context on (W3C ``traceparent``
header) to P and D; each instance's front, once the call is done, records a
span under that context with one child span per phase it measured (the same
phases as ``timing``), so one trace shows the request across router, P and D.
Spans are exported over OTLP/HTTP (``pip install 'pdserve[tracing]'``).

Phases are durations on each process's own monotonic clock; a span's start
and end are placed on the wall clock by their distance from now.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

# The journey's own headers, plain HTTP whether or not OpenTelemetry is on.
TIMING_HEADER = "x-pdserve-timing"  # "1": answer with the request's journey, as "return_timing": true does
ROUTER_TIME_HEADER = "x-pdserve-router-s"  # router -> D: seconds from receiving the call to sending it on

MISSING_SDK = "--otlp-traces-endpoint needs OpenTelemetry: pip install 'pdserve[tracing]'"


def wall_ns(monotonic_s: float) -> int:
    """The wall-clock time (ns since the epoch) of a ``time.monotonic()`` reading."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


class Tracer:
    """Spans of one service; ``enabled`` is False (and everything a no-op) without an endpoint."""

    def __init__(self, service_name: str, endpoint: str | None = None, exporter: Any = None) -> None:
        self.enabled = endpoint is not None or exporter is not None
        if not self.enabled:
            return
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as exc:
            raise RuntimeError(MISSING_SDK) from exc
        if exporter is None:
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError as exc:
                raise RuntimeError(MISSING_SDK) from exc
            processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint))
        else:  # tests hand in an in-memory exporter and read it at once
            processor = SimpleSpanProcessor(exporter)
        self._provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self._provider.add_span_processor(processor)
        self._tracer = self._provider.get_tracer("pdserve")
        self._propagator = TraceContextTextMapPropagator()

    def start(self, name: str, start_s: float, headers: Mapping[str, str] | None = None,
              attributes: Mapping[str, Any] | None = None) -> Any:
        """An open span (None when disabled), child of the context in ``headers``."""
        if not self.enabled:
            return None
        parent = self._propagator.extract(dict(headers)) if headers else None
        return self._tracer.start_span(name, context=parent, start_time=wall_ns(start_s),
                                       attributes=dict(attributes or {}))

    def headers(self, span: Any) -> dict[str, str]:
        """The ``traceparent`` header that makes the receiver's spans children of ``span``."""
        if span is None:
            return {}
        from opentelemetry import trace

        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=trace.set_span_in_context(span))
        return carrier

    def phases(self, parent: Any, phases_s: Mapping[str, float], end_s: float) -> None:
        """One child span per phase, back to back, the last ending at ``end_s``."""
        if parent is None:
            return
        from opentelemetry import trace

        context = trace.set_span_in_context(parent)
        start_s = end_s - sum(phases_s.values())
        for name, seconds in phases_s.items():
            span = self._tracer.start_span(name, context=context, start_time=wall_ns(start_s))
            start_s += seconds
            span.end(end_time=wall_ns(start_s))

    def end(self, span: Any, end_s: float | None = None) -> None:
        if span is not None:
            span.end(end_time=wall_ns(time.monotonic() if end_s is None else end_s))

    def record(self, name: str, start_s: float, end_s: float, phases_s: Mapping[str, float],
               headers: Mapping[str, str] | None = None, attributes: Mapping[str, Any] | None = None) -> None:
        """A finished span from ``start_s`` to ``end_s`` with its phases as children."""
        span = self.start(name, start_s, headers, attributes)
        self.phases(span, phases_s, end_s)
        self.end(span, end_s)

    def shutdown(self) -> None:
        if self.enabled:
            self._provider.shutdown()
