"""OpenTelemetry: spans for enqueue, acquire and the hook call, one trace per task.

The enqueuing request's context is stored with the task, so every attempt's spans join the
client's trace and the hook receives a ``traceparent`` of it. With no ``OTEL_*`` exporter
configured the API's no-op tracer is used: no exporter, no overhead.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

logger = logging.getLogger("ntorque.tracing")

tracer = trace.get_tracer("ntorque")

_configured = False


def setup_tracing(role: str, environ: Mapping[str, str] | None = None) -> bool:
    """Install an OTLP/HTTP exporter when ``OTEL_*`` variables ask for one; return whether."""
    global _configured
    env = os.environ if environ is None else environ
    if _configured:
        return True
    exporter_name = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    if exporter_name == "none" or not (endpoint or exporter_name in ("otlp", "console")):
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    attributes = {"service.name": env.get("OTEL_SERVICE_NAME", "ntorque"), "ntorque.role": role}
    provider = TracerProvider(resource=Resource.create(attributes))
    if exporter_name == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _configured = True
    logger.info("tracing: exporting spans (%s)", exporter_name or "otlp")
    return True


def extract(headers: Mapping[str, str]) -> otel_context.Context:
    """The caller's trace context from incoming request headers (or an empty one)."""
    return propagate.extract(headers)


def current_carrier() -> str | None:
    """The current span's context as stored with a task (JSON of the W3C headers)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return json.dumps(carrier) if carrier else None


def stored_context(stored: str | None) -> otel_context.Context | None:
    if not stored:
        return None
    try:
        carrier = json.loads(stored)
    except ValueError:
        return None
    return propagate.extract(carrier) if isinstance(carrier, dict) else None


def outgoing_headers() -> list[tuple[str, str]]:
    """``traceparent`` (and ``tracestate``) of the current span, for the hook call."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())
