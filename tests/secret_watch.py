"""Every key in play, searched for in everything the gateway says during the whole test run.

The conftest routes all log output of the test process through `SecretWatch.log_stream()`,
attaches `SecretWatch.trace_config()` to every client of a gateway (caller port and admin
port), and at the end of the session also searches the log files of the real processes the
tests started. A key found anywhere fails the run, naming where it was seen (never the key).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import aiohttp


class SecretWatch:
    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = tuple(sorted(set(secrets)))
        # A key split across two chunks is still seen: each chunk is searched with the
        # tail of the one before it.
        self._overlap = max(len(secret) for secret in self.secrets) - 1
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

    def trace_config(self) -> aiohttp.TraceConfig:
        """Searches response headers and every body chunk a client receives."""
        trace = aiohttp.TraceConfig()

        async def on_start(
            session: aiohttp.ClientSession,
            context: SimpleNamespace,
            params: aiohttp.TraceRequestStartParams,
        ) -> None:
            context.tail = b""

        async def on_headers(
            session: aiohttp.ClientSession,
            context: SimpleNamespace,
            params: aiohttp.TraceRequestEndParams,
        ) -> None:
            headers = "\n".join(f"{k}: {v}" for k, v in params.response.headers.items())
            self.search(f"response headers of {params.method} {params.url.path}", headers)

        async def on_chunk(
            session: aiohttp.ClientSession,
            context: SimpleNamespace,
            params: aiohttp.TraceResponseChunkReceivedParams,
        ) -> None:
            window = context.tail + params.chunk
            self.search(f"response body of {params.method} {params.url.path}", window)
            context.tail = window[-self._overlap :]

        trace.on_request_start.append(on_start)
        trace.on_request_end.append(on_headers)
        trace.on_response_chunk_received.append(on_chunk)
        trace.freeze()
        return trace


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
