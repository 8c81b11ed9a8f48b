"""uvicorn's HTTP protocol, answering requests its parser refuses with ntorque's JSON error.

A request the parser cannot read (a malformed header name or value, a bad Content-Length)
never reaches the app; uvicorn answers it with a plain-text 400 of its own. Every error of
the API is JSON (``{"error": ..., "code": ...}``), these included.

The parser (httptools) sets no limit on a request's head: one connection streaming an
endless header would grow the process's memory until the dyno is killed. A head still
incomplete after ``MAX_HEAD_BYTES`` is refused with 431.

Nor does uvicorn set a deadline on a head: its keep-alive timer stops at the first byte, so
a client sending one byte every few seconds (slowloris) would hold its connection for ever.
A head still incomplete ``head_timeout_s`` (NTORQUE_BODY_TIMEOUT) after its first read is
refused with 408, and bytes that begin no request (blank lines) get the same time before the
connection is closed. The timer is armed only when a read ends inside a head: a head that
arrives in one read, as nearly all do, costs two attribute checks.

A connection that sends nothing at all is closed after uvicorn's keep-alive timeout, as an
idle one is after an answer (uvicorn arms that timer only after an answer).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import metrics

BAD_REQUEST_CODE = "bad_request"
HEAD_TOO_LARGE_CODE = "headers_too_large"
HEAD_TIMEOUT_CODE = "head_timeout"
# The request line and headers of one request. Heroku's router allows 8 KiB per line; every
# legitimate request ntorque serves fits in a few KiB (a URL of NTORQUE_MAX_URL_LENGTH,
# passthrough headers). A head may exceed this by one read (at most 256 KiB) before it is
# refused: counting starts with the read after the one that began the head, which may also
# hold the end of the previous request.
MAX_HEAD_BYTES = 64 * 1024


def bad_request_message(message: str) -> str:
    return f"malformed HTTP request: {message.rstrip('.')}"


class OneWritePerTurn:
    """A transport that sends what one turn of the event loop writes as one ``write``.

    uvicorn writes a response's head and its body separately: two sends, and often two
    wake-ups of the client, where one would do. On this path every wake-up of another
    process costs more than the rest of the request (bench A, py-spy). A write is held until
    the next one (a body after its head), which sends both at once; one left alone goes at
    the end of the turn, or at a close. Holding everything to the end of the turn instead
    delays each answer behind the rest of the turn's work: A ran ~3.5 % slower that way.
    """

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._held: bytes | None = None
        self._loop = loop

    def write(self, data: bytes) -> None:
        held = self._held
        if held is None:
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            # The body after its head: both go now, not at the end of the turn.
            self._held = None
            self._transport.write(held + data)

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        # get_extra_info, pause_reading, resume_reading, abort... as the transport has them.
        return getattr(self._transport, name)


class JsonErrorsProtocol(HttpToolsProtocol):
    # NTORQUE_BODY_TIMEOUT (its default here), set by ``web.create_app``: uvicorn is given
    # this class, not an instance, and the processes of ``ntorque web --workers`` run only
    # the app factory before they serve.
    head_timeout_s: ClassVar[float] = 30.0
    _head_scope: object = None  # the scope of the request whose head is being counted
    _head_bytes = 0
    _head_timer: asyncio.TimerHandle | None = None
    # An error answer that waits for the answers owed to the requests read before it.
    _held_error: tuple[int, bytes, str, str] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(OneWritePerTurn(transport, self.loop))  # type: ignore[arg-type]
        # uvicorn arms its keep-alive timer only after an answer: a connection that never
        # sends a byte would stay open for ever. Its first byte stops the timer, as after one.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope and not cycle.response_complete:
            # A request under way, its head complete (a body may follow): nearly every read.
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            return
        self._head_pending(len(data))

    def _head_pending(self, size: int) -> None:
        """A read that ended inside a head, or that began no request at all."""
        if self.transport.is_closing() or self._held_error is not None:
            return
        scope, cycle = self.scope, self.cycle
        if scope is None or (cycle is not None and cycle.scope is scope):
            # No request begun (blank lines, or the rest of a body answered early): uvicorn
            # stopped its keep-alive timer at these bytes, so this one stands in for it.
            if self._head_timer is None:
                self._start_head_timer()
            return
        if self._head_scope is not scope:
            # A new head began in this read; the previous one, if any, is complete.
            self._head_scope, self._head_bytes = scope, 0
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._start_head_timer()
            return
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            error = f"the request line and headers are larger than {MAX_HEAD_BYTES} bytes"
            self._send_error(431, b"Request Header Fields Too Large", error, HEAD_TOO_LARGE_CODE)

    def _start_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        scope, cycle = self.scope, self.cycle
        if scope is None or (cycle is not None and cycle.scope is scope):
            self.transport.close()  # no request begun: closed as an idle connection is
            return
        if cycle is not None and not cycle.response_complete:
            # A head pipelined behind a request still being answered (uvicorn reads no more
            # until it is): a 408 now would cut into that answer. The deadline starts again.
            self._start_head_timer()
            return
        error = (
            f"the request line and headers did not arrive within {self.head_timeout_s:g} seconds"
        )
        self._send_error(408, b"Request Timeout", error, HEAD_TIMEOUT_CODE)

    def connection_lost(self, exc: Exception | None) -> None:
        # Always: uvicorn cancels its own keep-alive timer only on a clean close.
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._unset_keepalive_if_required()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        held = self._held_error
        if held is not None and not self._answers_owed():
            self._held_error = None
            self._send_error(*held)

    def _answers_owed(self) -> bool:
        """Whether requests read whole before the current one still await their answers.

        ``self.cycle`` is the last request whose head was read; those pipelined before it
        are answered first, so it is the last to complete.
        """
        cycle = self.cycle
        return cycle is not None and not cycle.response_complete and not cycle.more_body

    def send_400_response(self, msg: str) -> None:
        self._send_error(400, b"Bad Request", bad_request_message(msg), BAD_REQUEST_CODE)

    def _send_error(self, status: int, reason: bytes, error: str, code: str) -> None:
        if self.transport.is_closing():
            return
        if self._answers_owed():
            # Sent now, the error would take the place of an answer owed to a request read
            # whole before this one: its client would take that request for refused,
            # though it is being served. It follows them; nothing more is read meanwhile.
            if self._held_error is None:
                self._held_error = (status, reason, error, code)
            self.flow.pause_reading()
            return
        metrics.api_error(status, code)
        body = json.dumps({"error": error, "code": code}).encode()
        head = [b"HTTP/1.1 %d " % status, reason, b"\r\n"]
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
