"""Session namespaces upstream, per tenant or per key (service).

Upstream keys a conversation by `session_id` alone and tenants may share one upstream key, so
without this a tenant could continue another tenant's conversation by sending its id. With
`session_isolation: tenant` (the default) a tenant's ids travel upstream as `gw:<tenant>:<id>`;
with `key`, each of its keys (services) has its own, `gw:<tenant>/<key>:<id>`, so services of one
team do not share conversations either; `off` sends ids as they are. Ids come back without the
prefix, in JSON bodies and in the stream's `done` event.

The mapping is injective: tenant and key names cannot contain `:` or `/` (config's
NAME_PATTERN), so the first `:` after `gw:` ends the owner and the rest is the caller's id,
verbatim, and a tenant's namespace and its keys' never overlap. A caller's own `gw:…` id only
lands deeper inside its own namespace; tenants without isolation may not send ids starting
with `gw:` at all, so no caller can name an id in another's namespace. Upstream takes ids of at
most 256 characters, so a caller gets 256 minus its prefix's length of them.

Everything here is pure: bytes and strings in, bytes and strings out.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from gateway.config import Tenant
from gateway.errors import InvalidRequest
from gateway.sse import Frame, SSEFramer, with_data
from gateway.validation import ChatRequest, folded

NAMESPACE = "gw:"
SEPARATOR = ":"  # never in a tenant or key name (config.NAME_PATTERN)
KEY_SEPARATOR = "/"  # nor this
# In characters. The upstream documents give no limit: this is the simulator's.
UPSTREAM_MAX_SESSION_ID = 256

_UNPARSED = object()
_MAX_SPLICES = 4  # strings opening with our prefix tried, each checked by one more parse


def namespace_prefix(tenant: str, key: str | None = None) -> str:
    """`gw:<tenant>:`, or per key `gw:<tenant>/<key>:` (names never hold `/` or `:`, so no
    namespace is a prefix of another's ids)."""
    owner = tenant if key is None else f"{tenant}{KEY_SEPARATOR}{key}"
    return f"{NAMESPACE}{owner}{SEPARATOR}"


def new_session_id() -> str:
    """An id for a request that named none, shaped like upstream's own."""
    return f"sess_{secrets.token_hex(12)}"


@dataclass(frozen=True, slots=True)
class SessionScope:
    """How one tenant's session ids look upstream; `prefix` is None without isolation."""

    prefix: str | None

    @classmethod
    def of(cls, tenant: Tenant, key_name: str) -> SessionScope:
        """The scope of one caller: its tenant's (`session_isolation: tenant`), its key's
        (`key`), or none (`off`)."""
        if tenant.session_isolation == "off":
            return cls(None)
        key = key_name if tenant.session_isolation == "key" else None
        return cls(namespace_prefix(tenant.name, key))

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
            # Folded as anything that normalises ids would see them: `GW:`, or `gw:` in
            # fullwidth letters, is our prefix all the same.
            if session_id is not None and folded(session_id).startswith(NAMESPACE):
                raise InvalidRequest(
                    f"session_id must not start with {NAMESPACE!r} in any case or form (reserved)"
                )
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

    def caller_event(self, frame: Frame, payload: object = _UNPARSED) -> bytes:
        """A frame's bytes for the caller: a `done` event's session_id translated back, any
        other frame's bytes unchanged (the same object).

        `payload` is the event's data already parsed (`usage.event_payload`), when the caller
        has it; it is not changed here.
        """
        if self.prefix is None or frame.event is None:
            return frame.raw
        if payload is _UNPARSED:
            payload = _loads(frame.event.data)
        if not isinstance(payload, dict) or payload.get("type") != "done":
            return frame.raw
        payload = dict(payload)
        if not self._translate(payload):
            return frame.raw
        for spliced in self._spliced(frame.raw):
            if _loads(_event_data(spliced)) == payload:
                return spliced
        # Upstream wrote the id in an unusual form: rebuild the event's data line instead.
        return with_data(frame.raw, _dumps(payload))


def _event_data(raw: bytes) -> str:
    """The data of the one whole event `raw`, read as the caller will read it."""
    frames = SSEFramer().feed(raw)
    event = frames[0].event if frames else None
    return "" if event is None else event.data


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
