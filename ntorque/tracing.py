"""OpenTelemetry: spans for enqueue, acquire and the hook call, one trace per task.

The enqueuing request's context is stored with the task, so every attempt's spans join the
client's trace and the hook receives a ``traceparent`` of it. With no ``OTEL_*`` exporter
configured the API's no-op tracer is used: no exporter, no overhead.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

logger = logging.getLogger("ntorque.tracing")

tracer = trace.get_tracer("ntorque")

_configured = False


def setup_tracing(role: str, environ: Mapping[str, str] | None = None) -> bool:
    """Install a span exporter when ``OTEL_*`` variables ask for one; return whether.

    The OTEL spec's variables, with one deliberate difference: the spec's default exporter
    is ``otlp``, but ntorque exports only when told to (an OTLP endpoint is set, or
    ``OTEL_TRACES_EXPORTER`` names an exporter), so an unconfigured install has no exporter
    and no overhead. ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turn it off.
    Sampler (``OTEL_TRACES_SAMPLER``), batch (``OTEL_BSP_*``), headers, timeouts and
    resource (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``) are read by the SDK.
    """
    global _configured
    env = os.environ if environ is None else environ
    if _configured:
        return True
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n]
    traces_endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    base_endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not names:
        names = ["otlp"] if (traces_endpoint or base_endpoint) else []
    names = [n for n in names if n != "none"]
    if not names:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    attributes: dict[str, str] = {"ntorque.role": role}
    named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    if not named:
        # Only a default: the user's OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win.
        attributes["service.name"] = "ntorque"
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in names:
        if name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name == "otlp":
            protocol = (
                env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf"
            )
            if protocol.strip() != "http/protobuf":
                logger.warning(
                    "tracing: OTLP protocol %r unsupported, using http/protobuf", protocol
                )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            # Per the spec: a signal-specific endpoint is used as is, the base one gets
            # /v1/traces appended; neither set means the exporter's localhost:4318 default.
            endpoint = traces_endpoint or (
                base_endpoint.rstrip("/") + "/v1/traces" if base_endpoint else None
            )
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        else:
            logger.warning("tracing: unknown OTEL_TRACES_EXPORTER %r ignored", name)
    trace.set_tracer_provider(provider)
    _configured = True
    logger.info("tracing: exporting spans (%s)", ",".join(names))
    return True


def use_tracer_provider(provider: trace.TracerProvider | None) -> None:
    """Send ntorque's spans to ``provider`` (tests); None returns to the global provider."""
    global tracer
    tracer = trace.get_tracer("ntorque") if provider is None else provider.get_tracer("ntorque")


def extract(headers: Mapping[str, str]) -> otel_context.Context:
    """The caller's trace context from incoming request headers (or an empty one)."""
    return propagate.extract(headers)


def current_carrier() -> str | None:
    """The current span's context as stored with a task (JSON of the W3C headers)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return json.dumps(carrier) if carrier else None


def new_carrier() -> str:
    """A stored context that starts a trace of the task's own, for when no tracer records.

    Every hook call carries a ``traceparent`` (the hook can join its own spans to it), and
    every attempt of a task carries the same trace, whether or not ntorque exports spans.
    """
    # The JSON that current_carrier() would write, without json.dumps: hex digits only.
    return f'{{"traceparent": "{_new_traceparent()}"}}'


def _new_traceparent() -> str:
    # Sampled, as the SDK's default sampler marks a new root: a hook that samples by its
    # parent keeps tracing as it would with no traceparent at all.
    trace_id = random.getrandbits(128) or 1
    span_id = random.getrandbits(64) or 1
    return f"00-{trace_id:032x}-{span_id:016x}-01"


def stored_headers(stored: str | None) -> list[tuple[str, str]]:
    """The stored context's headers as they are, for a hook call when no tracer records.

    A task stored without one (written by a client itself, or before ntorque stored one for
    every task) gets a new trace, so that every hook call carries a ``traceparent``.
    """
    if stored:
        try:
            carrier = json.loads(stored)
        except ValueError:
            carrier = None
        if isinstance(carrier, dict) and carrier:
            return [(k, v) for k, v in carrier.items() if isinstance(k, str) and isinstance(v, str)]
    return [("traceparent", _new_traceparent())]


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


def off() -> bool:
    """No tracer provider is installed (neither by OTEL_* settings nor by a test)."""
    return isinstance(tracer, trace.ProxyTracer) and isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider
    )
