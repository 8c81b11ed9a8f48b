"""https hooks: certificates are verified, a custom CA bundle is honoured, http→https works."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from ntorque.hooks import AiohttpHookClient, classify
from ntorque.models import Task
from ntorque.settings import Settings

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA, and a certificate it signed for 127.0.0.1."""
    d = tmp_path_factory.mktemp("certs")
    _openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.pem", "-days", "1", "-subj", "/CN=ntorque test CA")  # fmt: skip
    _openssl(d, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
             "-out", "server.csr", "-subj", "/CN=127.0.0.1")  # fmt: skip
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    _openssl(d, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "1",
             "-extfile", "ext.cnf")  # fmt: skip
    return d


async def _serve(app: web.Application, ssl_context: ssl.SSLContext | None) -> web.AppRunner:
    runner = web.AppRunner(app, shutdown_timeout=0.2, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
    return runner


@pytest.fixture
async def https_hook(certs: Path) -> AsyncIterator[str]:
    """An https hook on 127.0.0.1 answering 200 (its URL)."""

    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=200)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs / "server.pem", certs / "server.key")
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    runner = await _serve(app, context)
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}/hook"
    finally:
        await runner.cleanup()


def _task(url: str) -> Task:
    now = time.time()
    return Task(id=1, app_id=None, url=url, method="POST", timeout=5, body=b"{}",
                content_type="application/json", headers=[], trace_context=None,
                status="PENDING", retry_count=1, due=now, created=now, modified=now,
                last_status=None, last_error=None)  # fmt: skip


async def _call(settings: Settings, url: str) -> tuple[int | None, str | None, str]:
    client = AiohttpHookClient(settings)
    try:
        result = await client.call(_task(url))
    finally:
        await client.close()
    return result.status_code, result.error, classify(result, settings.transient_request_errors)


async def test_a_certificate_from_an_unknown_ca_is_refused_and_retried(
    https_hook: str, tmp_path: Path
) -> None:
    settings = Settings.from_env({"NTORQUE_SQLITE_PATH": str(tmp_path / "x.sqlite3")})
    code, error, verdict = await _call(settings, https_hook)
    assert code is None
    assert error is not None and "certificate" in error.lower()
    assert verdict == "retry"  # the operator may fix the certificate; the task waits


async def test_a_custom_ca_bundle_is_trusted(https_hook: str, certs: Path, tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "NTORQUE_SQLITE_PATH": str(tmp_path / "x.sqlite3"),
            "NTORQUE_CA_BUNDLE": str(certs / "ca.pem"),
        }
    )
    code, error, verdict = await _call(settings, https_hook)
    assert (code, error, verdict) == (200, None, "completed")


async def test_a_redirect_from_http_to_https_is_followed(
    https_hook: str, certs: Path, tmp_path: Path
) -> None:
    async def redirect(request: web.Request) -> web.Response:
        await request.read()
        raise web.HTTPTemporaryRedirect(https_hook)  # 307: method and body kept

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    runner = await _serve(app, None)
    settings = Settings.from_env(
        {
            "NTORQUE_SQLITE_PATH": str(tmp_path / "x.sqlite3"),
            "NTORQUE_CA_BUNDLE": str(certs / "ca.pem"),
        }
    )
    try:
        code, error, verdict = await _call(
            settings, f"http://127.0.0.1:{runner.addresses[0][1]}/start"
        )
    finally:
        await runner.cleanup()
    assert (code, error, verdict) == (200, None, "completed")
