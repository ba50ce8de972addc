"""Per-tenant session namespaces upstream.

Upstream keys a conversation by `session_id` alone and tenants may share one upstream key, so
without this a tenant could continue another tenant's conversation by sending its id. With
`session_isolation` (the default) a tenant's ids travel upstream as `gw:<tenant>:<id>` and come
back without the prefix, in JSON bodies and in the stream's `done` event.

The mapping is injective: tenant names cannot contain `:` (config's NAME_PATTERN), so the first
`:` after `gw:` ends the tenant name and the rest is the caller's id, verbatim. A caller's own
`gw:…` id only lands deeper inside its own namespace; tenants without isolation may not send ids
starting with `gw:` at all, so no caller can name an id in another tenant's namespace. Upstream
takes ids of at most 256 characters, so a tenant's callers get 252 - len(tenant) of them.

Everything here is pure: bytes and strings in, bytes and strings out.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from gateway.config import Tenant
from gateway.errors import InvalidRequest
from gateway.sse import MAX_LINE
from gateway.validation import ChatRequest

NAMESPACE = "gw:"
SEPARATOR = ":"  # never in a tenant name (config.NAME_PATTERN)
UPSTREAM_MAX_SESSION_ID = 256  # upstream's documented limit, in characters

_LINE_END = re.compile(rb"\r\n?|\n")
_BOM = b"\xef\xbb\xbf"
_UNPARSED = object()
_MAX_SPLICES = 4  # strings opening with our prefix tried, each checked by one more parse


def namespace_prefix(tenant: str) -> str:
    return f"{NAMESPACE}{tenant}{SEPARATOR}"


def new_session_id() -> str:
    """An id for a request that named none, shaped like upstream's own."""
    return f"sess_{secrets.token_hex(12)}"


@dataclass(frozen=True, slots=True)
class SessionScope:
    """How one tenant's session ids look upstream; `prefix` is None without isolation."""

    prefix: str | None

    @classmethod
    def of(cls, tenant: Tenant) -> SessionScope:
        return cls(namespace_prefix(tenant.name) if tenant.session_isolation else None)

    @property
    def max_caller_id(self) -> int:
        return UPSTREAM_MAX_SESSION_ID - len(self.prefix or "")

    def to_upstream(self, session_id: str) -> str:
        return session_id if self.prefix is None else self.prefix + session_id

    def to_caller(self, session_id: str) -> str:
        """Strip exactly our prefix; an id without it (never expected) passes unchanged."""
        if self.prefix is not None and session_id.startswith(self.prefix):
            return session_id[len(self.prefix) :]
        return session_id

    def upstream_body(self, chat: ChatRequest) -> bytes:
        """The body to send upstream: the caller's bytes, or with isolation its session
        (given or new) namespaced and every other field as the caller sent it."""
        session_id = chat.session_id
        if self.prefix is None:
            if session_id is not None and session_id.startswith(NAMESPACE):
                raise InvalidRequest(f"session_id must not start with {NAMESPACE!r} (reserved)")
            return chat.body
        if session_id is None:
            session_id = new_session_id()
        elif len(session_id) > self.max_caller_id:
            raise InvalidRequest(
                f"session_id must be 1 to {self.max_caller_id} printable characters"
            )
        fields = dict(chat.fields) if chat.fields else json.loads(chat.body)
        fields["session_id"] = self.to_upstream(session_id)
        return _dumps(fields)

    def caller_body(self, body: bytes, parsed: object = _UNPARSED) -> bytes:
        """A JSON answer with its session_id translated back; anything else unchanged.

        `parsed` is `body` already parsed (`parse_answer`), when the caller has it; it may be
        changed here.
        """
        if self.prefix is None:
            return body
        payload = _loads(body) if parsed is _UNPARSED else parsed
        if not isinstance(payload, dict) or not self._translate(payload):
            return body
        for spliced in self._spliced(body):
            if _loads(spliced) == payload:
                return spliced
        return _dumps(payload)

    def stream_rewriter(self) -> DoneEventRewriter | None:
        return None if self.prefix is None else DoneEventRewriter(self)

    @property
    def marker(self) -> bytes:
        # How our prefix opens a JSON string (its characters never need escaping).
        return b'"' + (self.prefix or "").encode()

    def _translate(self, payload: dict[str, object]) -> bool:
        session_id = payload.get("session_id")
        if not isinstance(session_id, str):
            return False
        caller_id = self.to_caller(session_id)
        payload["session_id"] = caller_id
        return caller_id != session_id

    def _spliced(self, raw: bytes) -> Iterator[bytes]:
        """`raw` with our prefix cut from one string that opens with it, every other byte
        kept: one candidate per such string (an escaped quote inside a string is none)."""
        marker, pos = self.marker, -1
        for _ in range(_MAX_SPLICES):
            pos = raw.find(marker, pos + 1)
            while pos > 0 and raw[pos - 1] == 0x5C:  # a backslash
                pos = raw.find(marker, pos + 1)
            if pos < 0:
                return
            yield raw[: pos + 1] + raw[pos + len(marker) :]

    def rewrite_done_event(self, raw: bytes) -> bytes | None:
        """A whole SSE event (blank line included) with a `done` payload's session_id
        translated back, or None when it is not such an event."""
        payload = _loads(event_data(raw))
        if not isinstance(payload, dict) or payload.get("type") != "done":
            return None
        if not self._translate(payload):
            return None
        for spliced in self._spliced(raw):
            if _loads(event_data(spliced)) == payload:
                return spliced
        # Upstream wrote the id in an unusual form: rebuild the event's data line instead.
        bom = _BOM if raw.startswith(_BOM) else b""
        kept = [
            text + end
            for text, end in _lines(raw.removeprefix(bom))
            if text and _field(text)[0] != "data"
        ]
        return bom + b"".join(kept) + b"data: " + _dumps(payload) + b"\n\n"


class DoneEventRewriter:
    """Passes an SSE stream on event by event, translating back the `done` event's id.

    Each complete event leaves as soon as its blank line arrives, byte for byte unless it is
    the `done` event; only the bytes of an event still incomplete are held, and an SSE client
    acts on nothing before that blank line anyway.
    """

    __slots__ = ("_line_start", "_pending", "_scope", "_skip_lf")

    def __init__(self, scope: SessionScope) -> None:
        self._scope = scope
        self._pending = b""
        self._line_start = 0  # where the current line began, in _pending (may be < 0)
        self._skip_lf = False  # the last chunk ended in a CR: a leading LF belongs to it

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send on now."""
        buf = self._pending + chunk if self._pending else chunk
        start = 0  # the event being read
        line = self._line_start
        scan = len(self._pending)
        if self._skip_lf:
            self._skip_lf = False
            if buf[scan : scan + 1] == b"\n":
                line = scan + 1
                if start == scan:  # it ends an event already sent: send it on too
                    start = scan + 1
                scan += 1
        pieces: list[bytes] = []
        sent = 0
        for match in _LINE_END.finditer(buf, scan):
            if match.start() == line:  # a blank line: the event [start, end) is whole
                end = match.end()
                rewritten = self._scope.rewrite_done_event(buf[start:end])
                if rewritten is not None:
                    pieces += (buf[sent:start], rewritten)
                    sent = end
                start = end
            line = match.end()
            self._skip_lf = match.group() == b"\r" and line == len(buf)
        if len(buf) - start > MAX_LINE:
            # An event this long is not upstream's done event: stop holding it.
            start = len(buf)
        pieces.append(buf[sent:start])
        self._pending = buf[start:]
        self._line_start = line - start
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def finish(self, tail: bytes = b"") -> bytes:
        """The stream is over: `tail` (the gateway's own bytes) and whatever is still held."""
        out = self.feed(tail)
        rest, self._pending, self._line_start = self._pending, b"", 0
        return out + rest


def event_data(raw: bytes) -> str:
    """The `data` of one raw SSE event, its lines joined with LF (as SSEScanner reads it)."""
    data = []
    for text, _ in _lines(raw.removeprefix(_BOM)):
        name, value = _field(text)
        if name == "data":
            data.append(value)
    return "\n".join(data)


def _lines(raw: bytes) -> list[tuple[bytes, bytes]]:
    lines, pos = [], 0
    for match in _LINE_END.finditer(raw):
        lines.append((raw[pos : match.start()], match.group()))
        pos = match.end()
    if pos < len(raw):
        lines.append((raw[pos:], b""))
    return lines


def _field(text: bytes) -> tuple[str, str]:
    if not text or text[:1] == b":":
        return "", ""  # a blank line or a comment
    name, colon, value = text.decode("utf-8", "replace").partition(":")
    return name, value[1:] if colon and value[:1] == " " else value


def parse_answer(body: bytes) -> object:
    """An upstream answer parsed once, for its usage and its session id; None if not JSON."""
    return _loads(body)


def _loads(text: str | bytes) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _dumps(payload: object) -> bytes:
    try:
        return json.dumps(payload, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate, sent as an escape: keep it one
        return json.dumps(payload).encode()
