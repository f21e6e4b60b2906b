"""Request bodies: Content-Length, the body cap and the bytes all bodies in memory may take,
`Expect: 100-continue`, and the lingering close of a connection whose request was refused with
its body unread.

Closing a socket that has unread data makes the kernel reset the connection. A client still
sending its body (http.client sends all of it before it reads) then sees a broken pipe, never
the 401/413/503 it was sent. So such a connection is half-closed and what the client still sends
is read and thrown away, within a time limit and a byte cap, before it is closed.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

from ..budget import ByteBudget, Hold, try_hold
from .service import ClientError

DIGITS = re.compile(r"[0-9]{1,19}")
LINGER_S = 2.0  # the longest a refused upload holds its connection slot (and thread)
LINGER_BYTES = 64 * 1024 * 1024  # about what a client on the same host sends in that time
MAX_LINGERING = 8  # refused connections read at once in threads of their own
DRAIN_CHUNK = 64 * 1024


def declares_body(headers: Any) -> bool:
    """True when a request's headers say a body follows (a Content-Length but 0, or chunked)."""
    if headers is None:  # the request line was refused before any header was read
        return False
    return (headers.get("Content-Length") or "0").strip() != "0" or "Transfer-Encoding" in headers


def linger(sock: socket.socket, limit_s: float = LINGER_S, max_bytes: int = LINGER_BYTES) -> int:
    """Half-close `sock`, then read and discard what the peer sends until it closes, `limit_s`
    pass or `max_bytes` are read; the number of bytes discarded. The caller closes `sock`."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + limit_s
    discarded = 0
    with contextlib.suppress(OSError):  # a timeout or a reset ends it like the peer's close
        while discarded < max_bytes and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            chunk = sock.recv(min(65536, max_bytes - discarded))
            if not chunk:
                break
            discarded += len(chunk)
    return discarded


class LingeringCloser:
    """Closes connections refused before a handler took them (the connection limit), each
    lingering in a thread of its own; past `limit` at once, they are closed at once."""

    def __init__(self, close: Callable[[socket.socket], None], limit: int = MAX_LINGERING) -> None:
        self._close = close
        self._slots = threading.BoundedSemaphore(limit)

    def close(self, sock: socket.socket) -> None:
        if not self._slots.acquire(blocking=False):
            self._close(sock)
            return
        try:
            threading.Thread(target=self._linger_then_close, args=(sock,), daemon=True).start()
        except RuntimeError:  # no thread to be had: closed at once after all
            self._slots.release()
            self._close(sock)

    def _linger_then_close(self, sock: socket.socket) -> None:
        try:
            linger(sock)
        finally:
            self._close(sock)
            self._slots.release()


class BodyHandler(BaseHTTPRequestHandler):
    """The request-body half of the HTTP handler; a subclass gives `body_limit`."""

    body_read = False  # this request's body was read (or drained)
    upload: Hold | None = None  # the body's bytes, held against `upload_room` while it is alive
    _expect_continue = False
    _linger = False

    @property
    def body_limit(self) -> int:
        raise NotImplementedError

    @property
    def upload_room(self) -> ByteBudget:
        """What the bodies read and still in use, on every connection, may take together."""
        raise NotImplementedError

    def handle_one_request(self) -> None:
        self.body_read = self._expect_continue = self._linger = False
        self.upload = None
        try:
            super().handle_one_request()
        finally:
            if self.upload is not None:
                self.upload.release()
                self.upload = None

    def handle_expect_100(self) -> bool:
        # http.server answers 100 before the token and the size are checked, and a client told
        # to go on sends a body that is then refused. It goes out once the body is wanted.
        self._expect_continue = True
        return True

    def finish(self) -> None:
        super().finish()
        if self._linger:
            linger(self.connection)

    def close_unread(self) -> None:
        """Close the connection after this answer; a body left unread is first read and
        discarded (`linger`), so that the client gets the answer rather than a reset."""
        self.close_connection = True
        self._linger = not self.body_read and declares_body(getattr(self, "headers", None))

    def read_body(self) -> bytes:
        """The request's body (Content-Length bytes); ClientError, nothing read, if refused."""
        length = self._content_length()
        if length < 0:
            raise ClientError(411, "a POST needs a Content-Length")
        self.upload = try_hold(self.upload_room, length)
        if self.upload is None:
            raise ClientError(503, f"uploads in flight fill the server's "
                                   f"{self.upload_room.limit >> 20} MiB for them; retry shortly",
                              {"Retry-After": "1"})
        self._continue()
        body = self.rfile.read(length)
        if len(body) != length:
            raise ConnectionResetError("body shorter than Content-Length")
        self.body_read = True
        return body

    def drain_body(self) -> bytes:
        """Read and drop a body sent where none is used (GET, OPTIONS); b""."""
        length = self._content_length()
        if length > 0:
            self._continue()
            while length > 0:  # in pieces: an unused body never takes memory (upload budget)
                chunk = self.rfile.read(min(length, DRAIN_CHUNK))
                if not chunk:
                    raise ConnectionResetError("body shorter than Content-Length")
                length -= len(chunk)
        self.body_read = True
        return b""

    def _continue(self) -> None:
        if self._expect_continue:
            self._expect_continue = False
            self.send_response_only(100)
            self.end_headers()

    def _content_length(self) -> int:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ClientError(411, "chunked bodies are not accepted; send Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            return -1
        if not DIGITS.fullmatch(raw.strip()):
            self.close_connection = True
            raise ClientError(400, "Content-Length is not a number")
        length = int(raw)
        if length > self.body_limit:
            raise ClientError(413, f"body of {length} bytes is over the {self.body_limit}-byte "
                                   "limit")
        return length
