"""uvicorn's HTTP protocol, answering requests its parser refuses with ntorque's JSON error.

A request the parser cannot read (a malformed header name or value, a bad Content-Length)
never reaches the app; uvicorn answers it with a plain-text 400 of its own. Every error of
the API is JSON (``{"error": ..., "code": ...}``), these included.

The parser (httptools) sets no limit on a request's head: one connection streaming an
endless header would grow the process's memory until the dyno is killed. A head still
incomplete after ``MAX_HEAD_BYTES`` is refused with 431.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

BAD_REQUEST_CODE = "bad_request"
HEAD_TOO_LARGE_CODE = "headers_too_large"
# The request line and headers of one request. Heroku's router allows 8 KiB per line; every
# legitimate request ntorque serves fits in a few KiB (a URL of NTORQUE_MAX_URL_LENGTH,
# passthrough headers). A head may exceed this by one read (at most 256 KiB) before it is
# refused: counting starts with the read after the one that began the head, which may also
# hold the end of the previous request.
MAX_HEAD_BYTES = 64 * 1024


def bad_request_body(message: str) -> bytes:
    error = f"malformed HTTP request: {message.rstrip('.')}"
    return json.dumps({"error": error, "code": BAD_REQUEST_CODE}).encode()


class JsonErrorsProtocol(HttpToolsProtocol):
    _head_scope: object = None  # the scope of the request whose head is being counted
    _head_bytes = 0

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:
            return  # no head under way: the last one is complete (a body may follow)
        if self._head_scope is not self.scope:
            self._head_scope, self._head_bytes = self.scope, 0
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            error = f"the request line and headers are larger than {MAX_HEAD_BYTES} bytes"
            body = json.dumps({"error": error, "code": HEAD_TOO_LARGE_CODE}).encode()
            self._send_error(b"431 Request Header Fields Too Large", body)

    def send_400_response(self, msg: str) -> None:
        self._send_error(b"400 Bad Request", bad_request_body(msg))

    def _send_error(self, status: bytes, body: bytes) -> None:
        head = [b"HTTP/1.1 ", status, b"\r\n"]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


# For uvicorn's ``http=`` setting.
HTTP_PROTOCOL = "ntorque.protocol:JsonErrorsProtocol"
