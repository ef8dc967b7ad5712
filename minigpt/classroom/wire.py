"""The channel between the trusted grader and an untrusted worker: framed messages under deadlines.

Every message is an 8-byte big-endian length followed by that many bytes. Requests (grader to
worker) are pickles: the worker is the side that must not be trusted, so the grader may send it rich
objects (a reference ``nn.Linear``, a tensor), and each request unpickles into fresh copies. Answers
(worker to grader) are JSON holding only the plain data of :mod:`minigpt.classroom.codec`, read by
:class:`Channel` under rules the worker cannot bend:

* the deadline is passed in by the grader for each read; nothing the worker sends moves it;
* a message longer than :data:`MESSAGE_LIMIT` or nested deeper than the codec allows, bytes that are
  not JSON, JSON that is not an object: each raises :class:`ChannelError` with a one-line reason,
  never a traceback.
"""

from __future__ import annotations

import fcntl
import json
import os
import selectors
import struct
import time
from typing import Any

HEADER = struct.Struct(">Q")


MESSAGE_LIMIT = 64 * 2**20  # the longest answer the grader reads (a few large tensors)


READ_CHUNK = 1 << 20


class ChannelError(BaseException):
    """The worker broke the protocol or went away; ``str()`` is a one-line reason.

    A BaseException so that a check's ``except Exception`` cannot swallow it."""


class CheckTimeout(ChannelError):
    """The deadline the grader set passed before the worker answered."""


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


def read_frame(stream, limit: int = MESSAGE_LIMIT) -> bytes | None:
    """Blocking read of one frame from a binary file (the worker's side); None at end of file."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (size,) = HEADER.unpack(head)
    if size > limit:
        raise ValueError(f"a request of {size} bytes is longer than {limit}")
    body = stream.read(size)
    return body if len(body) == size else None


def parse_answer(body: bytes) -> dict:
    """One JSON object from the worker, or ChannelError saying why not."""
    try:
        value = json.loads(body)
    except RecursionError:
        raise ChannelError("the worker sent a message nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise ChannelError("the worker sent a message that is not JSON") from None
    if not isinstance(value, dict):
        raise ChannelError("the worker sent a message that is not a JSON object")
    return value


class Channel:
    """The grader's end of a worker's stdin (requests) and stdout (answers)."""

    def __init__(self, proc):
        self.proc = proc
        self.out = proc.stdout.fileno()
        self.inp = proc.stdin.fileno() if proc.stdin is not None else None
        for fd in (self.out, self.inp):
            if fd is not None:
                flags = fcntl.fcntl(fd, fcntl.F_GETFL)
                fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        self.buffer = bytearray()
        self.ended = False

    def _wait(self, fd: int, event: int, deadline: float) -> None:
        wait = deadline - time.monotonic()
        if wait <= 0:
            raise CheckTimeout("the deadline passed")
        with selectors.DefaultSelector() as selector:
            selector.register(fd, event)
            if not selector.select(timeout=wait):
                raise CheckTimeout("the deadline passed")

    def send(self, payload: bytes, deadline: float) -> None:
        """Write one request; the worker must read it before ``deadline``."""
        if self.inp is None:
            raise ChannelError("the worker takes no requests")
        data = memoryview(frame(payload))
        while data:
            self._wait(self.inp, selectors.EVENT_WRITE, deadline)
            try:
                written = os.write(self.inp, data)
            except BlockingIOError:
                continue
            except (BrokenPipeError, OSError):
                raise ChannelError("the worker closed its end of the channel") from None
            data = data[written:]

    def _fill(self, size: int, deadline: float) -> None:
        while len(self.buffer) < size:
            if self.ended:
                raise ChannelError("the worker ended without answering")
            self._wait(self.out, selectors.EVENT_READ, deadline)
            try:
                chunk = os.read(self.out, min(READ_CHUNK, size - len(self.buffer)))
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                self.ended = True
            self.buffer += chunk

    def receive(self, deadline: float, limit: int = MESSAGE_LIMIT) -> dict:
        """The next answer as a dict; CheckTimeout at ``deadline``, ChannelError when malformed."""
        self._fill(HEADER.size, deadline)
        (size,) = HEADER.unpack(bytes(self.buffer[: HEADER.size]))
        if size > limit:
            raise ChannelError(
                f"the worker announced a message of {size} bytes (the limit is {limit})"
            )
        self._fill(HEADER.size + size, deadline)
        body = bytes(self.buffer[HEADER.size : HEADER.size + size])
        del self.buffer[: HEADER.size + size]
        return parse_answer(body)

    def request(self, payload: bytes, deadline: float) -> dict:
        self.send(payload, deadline)
        return self.receive(deadline)


def drain(fd: int, deadline: float, limit: int) -> bytes:
    """Up to ``limit`` bytes a finished worker left in its pipe, read until end or ``deadline``."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    data = bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while len(data) < limit:
            wait = deadline - time.monotonic()
            if wait <= 0 or not selector.select(timeout=wait):
                break
            try:
                chunk = os.read(fd, min(READ_CHUNK, limit - len(data)))
            except BlockingIOError:
                continue
            except OSError:
                break
            if not chunk:
                break
            data += chunk
    return bytes(data)


def first_object(data: bytes) -> dict[str, Any] | None:
    """The first well-formed framed JSON object in ``data`` (a finished worker's report)."""
    if len(data) < HEADER.size:
        return None
    (size,) = HEADER.unpack(data[: HEADER.size])
    if size > len(data) - HEADER.size:
        return None
    try:
        return parse_answer(data[HEADER.size : HEADER.size + size])
    except ChannelError:
        return None
