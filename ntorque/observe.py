"""Metrics exposition and delivery for every process (web, worker, clock, run)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest, start_http_server

from .settings import Settings


def exposition() -> tuple[bytes, str]:
    """This process's metrics in Prometheus text format."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def prepare_web_workers(settings: Settings) -> None:
    """Set up whatever several uvicorn worker processes need to share metrics."""
    return None


async def start_process_metrics(settings: Settings, role: str) -> Any:
    """Serve this process's metrics on NTORQUE_METRICS_PORT, if set."""
    if settings.metrics_port is not None and role in ("worker", "clock"):
        start_http_server(settings.metrics_port)
    return None


async def stop_process_metrics(handle: Any) -> None:
    return None
