"""Every key in play, searched for in everything the gateway says during the whole test run.

The conftest routes all log output of the test process through `SecretWatch.log_stream()`,
gives every client of a gateway (caller port and admin port) the response class of
`SecretWatch.response_class()`, and at the end of the session also searches the log files
of the real processes the tests started. A key found anywhere fails the run, naming where
it was seen (never the key).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import aiohttp
from aiohttp.connector import Connection
from aiohttp.streams import AsyncStreamIterator, StreamReader


class SecretWatch:
    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = tuple(sorted(set(secrets)))
        # A key split across two chunks is still seen: each chunk is searched with the
        # tail of the one before it.
        self.overlap = max(len(secret) for secret in self.secrets) - 1
        self.found: list[str] = []
        self.bytes_searched = 0

    def search(self, where: str, data: str | bytes) -> None:
        text = data.decode(errors="replace") if isinstance(data, bytes) else data
        self.bytes_searched += len(text)
        for index, secret in enumerate(self.secrets):
            if secret in text:
                self.found.append(f"secret #{index} ({len(secret)} chars) in {where}")

    def search_files(self, paths: Iterable[Path]) -> int:
        count = 0
        for path in paths:
            self.search(f"file {path}", path.read_bytes())
            count += 1
        return count

    def log_stream(self) -> io.TextIOBase:
        return _LogStream(self)

    def response_class(self) -> type[aiohttp.ClientResponse]:
        """For `ClientSession(response_class=...)`: searches the headers and every body byte
        the test reads, however it reads them (read, readany, readuntil, iter_any, ...)."""
        watch = self

        class WatchedResponse(aiohttp.ClientResponse):
            async def start(self, connection: Connection) -> aiohttp.ClientResponse:
                response = await super().start(connection)
                where = f"response to {self.method} {self.url.path}"
                watch.search(where, "\n".join(f"{k}: {v}" for k, v in self.headers.items()))
                self.content = cast(StreamReader, _WatchedBody(self.content, watch, where))
                return response

        return WatchedResponse


class _WatchedBody:
    """A response body reader that hands what it returns to the watch (with the tail of what
    came before, so a key split between two reads is still seen)."""

    def __init__(self, inner: StreamReader, watch: SecretWatch, where: str) -> None:
        self._inner = inner
        self._watch = watch
        self._where = where
        self._tail = b""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _seen(self, data: bytes) -> bytes:
        window = self._tail + data
        self._watch.search(self._where, window)
        self._tail = window[-self._watch.overlap :]
        return data

    async def read(self, n: int = -1) -> bytes:
        return self._seen(await self._inner.read(n))

    async def readany(self) -> bytes:
        return self._seen(await self._inner.readany())

    async def readline(self) -> bytes:
        return self._seen(await self._inner.readline())

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        return self._seen(await self._inner.readuntil(separator))

    async def readexactly(self, n: int) -> bytes:
        return self._seen(await self._inner.readexactly(n))

    async def readchunk(self) -> tuple[bytes, bool]:
        data, end = await self._inner.readchunk()
        return self._seen(data), end

    def iter_any(self) -> AsyncStreamIterator[bytes]:
        return AsyncStreamIterator(self.readany)

    def iter_chunked(self, n: int) -> AsyncStreamIterator[bytes]:
        return AsyncStreamIterator(lambda: self.read(n))

    def __aiter__(self) -> AsyncStreamIterator[bytes]:
        return AsyncStreamIterator(self.readline)


class _LogStream(io.TextIOBase):
    """A log handler's stream: searched line by line, then passed on to the current stderr
    (looked up per write, so pytest's capture of a test still sees its logs)."""

    def __init__(self, watch: SecretWatch) -> None:
        self._watch = watch

    def write(self, text: str) -> int:
        self._watch.search("a log line", text)
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return False
