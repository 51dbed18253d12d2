"""W3C trace context: taken from the caller's OpenTelemetry context when ``opentelemetry-api``
is installed (``pip install agentmesh[otel]``), else nothing is sent."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

_FIELDS = ("traceparent", "tracestate")


def inject(metadata: list[tuple[str, str]]) -> None:
    """Appends the current span's ``traceparent``/``tracestate`` to call metadata."""
    try:
        from opentelemetry import propagate
    except ImportError:
        return
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    metadata.extend((k.lower(), v) for k, v in carrier.items() if k.lower() in _FIELDS)


def headers() -> dict[str, str]:
    """The current span's trace context as event headers."""
    metadata: list[tuple[str, str]] = []
    inject(metadata)
    return dict(metadata)


@contextlib.contextmanager
def attached(trace_context: Mapping[str, str]) -> Iterator[None]:
    """Makes ``trace_context`` (a task's) the current OpenTelemetry context while inside."""
    try:
        from opentelemetry import context, propagate
    except ImportError:
        yield
        return
    token = context.attach(propagate.extract(dict(trace_context)))
    try:
        yield
    finally:
        context.detach(token)
