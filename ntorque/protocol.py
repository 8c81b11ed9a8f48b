"""uvicorn's HTTP protocol, answering requests its parser refuses with ntorque's JSON error.

A request the parser cannot read (a malformed header name or value, a bad Content-Length)
never reaches the app; uvicorn answers it with a plain-text 400 of its own. Every error of
the API is JSON (``{"error": ..., "code": ...}``), these included.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

BAD_REQUEST_CODE = "bad_request"


def bad_request_body(message: str) -> bytes:
    error = f"malformed HTTP request: {message.rstrip('.')}"
    return json.dumps({"error": error, "code": BAD_REQUEST_CODE}).encode()


class JsonErrorsProtocol(HttpToolsProtocol):
    def send_400_response(self, msg: str) -> None:
        body = bad_request_body(msg)
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
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
