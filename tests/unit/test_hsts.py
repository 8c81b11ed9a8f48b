"""HSTS behind a proxy: the protocol header decides between a redirect and the HSTS header."""

from __future__ import annotations

from pathlib import Path

import httpx

from ntorque.settings import Settings
from ntorque.web import create_app


def _client(tmp_path: Path, **env: str) -> httpx.AsyncClient:
    settings = Settings.from_env({"NTORQUE_SQLITE_PATH": str(tmp_path / "db.sqlite3"), **env})
    # GET / and the redirect need no store, so the app's lifespan is not run here.
    transport = httpx.ASGITransport(app=create_app(settings))
    return httpx.AsyncClient(transport=transport, base_url="http://ntorque.example")


async def test_https_requests_get_the_hsts_header(tmp_path: Path) -> None:
    env = {"NTORQUE_ENABLE_HSTS": "true", "HSTS_PROTOCOL_HEADER": "X-Forwarded-Proto"}
    async with _client(tmp_path, **env) as client:
        response = await client.get("/", headers={"X-Forwarded-Proto": "https"})
    assert response.status_code == 200
    assert response.headers["strict-transport-security"].startswith("max-age=")


async def test_plain_http_is_redirected_to_https_keeping_the_method(tmp_path: Path) -> None:
    env = {"NTORQUE_ENABLE_HSTS": "true", "HSTS_PROTOCOL_HEADER": "X-Forwarded-Proto"}
    async with _client(tmp_path, **env) as client:
        get = await client.get("/tasks/1?x=1", headers={"X-Forwarded-Proto": "http"})
        post = await client.post("/?url=http://127.0.0.1/", headers={"X-Forwarded-Proto": "http"})
    assert get.status_code == 301
    assert get.headers["location"] == "https://ntorque.example/tasks/1?x=1"
    # 308: a POST must stay a POST with its body when the client follows the redirect.
    assert post.status_code == 308
    assert post.headers["location"].startswith("https://ntorque.example/?url=")


async def test_hsts_is_off_by_default(tmp_path: Path) -> None:
    async with _client(tmp_path) as client:
        response = await client.get("/", headers={"X-Forwarded-Proto": "http"})
    assert response.status_code == 200
    assert "strict-transport-security" not in response.headers
