"""What a chat request must be before anything goes upstream.

The body is forwarded byte for byte, so anything the gateway reads differently from upstream
(a second `message`, a UTF-16 body, `NaN`) could validate one request and send another: such
bodies are refused here, with a 400 that says what to fix. Nothing the caller sent is echoed
beyond a short, plain field name, so a message cannot carry a secret back out.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from itertools import accumulate

from aiohttp import web

from gateway.errors import InvalidRequest, RequestTooLarge

MAX_SESSION_ID = 256
# Deeper than any real chat body; json's recursive parser must never get near the
# interpreter's recursion limit (a RecursionError would be a 500).
MAX_DEPTH = 32
# Longer integers are not numbers anyone means (and past 4,300 digits Python refuses them).
MAX_INT_DIGITS = 100
# The whole body must arrive within this many seconds of the handler asking for it: a caller
# trickling a byte a second would otherwise hold a connection and a handler for ever.
BODY_READ_TIMEOUT = 10.0

# One JSON string (possibly unterminated: it then runs to the end, as the parser would read
# it). Unrolled so matching is linear: the two alternatives never overlap.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
# Brackets become +1/-1 (as signed bytes); every other byte is dropped.
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[{]}")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_KEY_PREFIXES = ("gw_", "ak_", "thns_")


@dataclass(frozen=True, slots=True)
class ChatRequest:
    message: str
    session_id: str | None
    stream: bool  # asked for by the body's `stream` or by the Accept header
    body: bytes  # exactly what the caller sent; forwarded unchanged
    fields: Mapping[str, object] = field(default_factory=dict, compare=False, repr=False)
    """The body as parsed here, so nothing downstream parses it again."""


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "a number"
    )


async def read_chat_request(
    request: web.Request, max_bytes: int, *, body_timeout: float | None = None
) -> ChatRequest:
    """The validated body; `body_timeout` (default BODY_READ_TIMEOUT) bounds reading it."""
    content_type = request.headers.get("Content-Type")
    if content_type is not None:
        mime = content_type.partition(";")[0].strip().lower()
        if mime != "application/json" and not mime.endswith("+json"):
            raise InvalidRequest(
                f"Content-Type must be application/json, got {mime[:64] or 'nothing'!r}"
            )
    if request.content_length is not None and request.content_length > max_bytes:
        raise _too_large(max_bytes)
    seconds = BODY_READ_TIMEOUT if body_timeout is None else body_timeout
    try:
        if request.content.is_eof():
            body = await request.read()  # all of it is here already: no timer to arm
        else:
            async with asyncio.timeout(seconds):
                body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(max_bytes) from None
    except TimeoutError:
        raise InvalidRequest(
            f"request body did not arrive within {seconds:g} s; send the whole body at once"
        ) from None
    except web.RequestPayloadError:
        # aiohttp inflates a Content-Encoding itself; a body that does not inflate ends here.
        raise InvalidRequest(
            "request body could not be decoded: check its Content-Encoding and framing"
        ) from None
    except ConnectionResetError:
        # The caller left mid-body (aiohttp usually cancels the handler first): nobody reads
        # this answer, but the log and metrics should not say 500.
        raise InvalidRequest("request body ended early: the connection closed") from None
    chat = parse_chat_body(body)
    if not chat.stream and accepts_event_stream(request.headers.get("Accept")):
        return replace(chat, stream=True)
    return chat


EVENT_STREAM = "text/event-stream"


def accepts_event_stream(accept: str | None) -> bool:
    """Whether an Accept header asks for an event stream, read as upstream reads it (media
    types are case-insensitive) and as RFC 9110 reads it (`;q=0` means "not this")."""
    if not accept:
        return False
    for media_range in accept.split(","):
        media, _, params = media_range.partition(";")
        if media.strip().lower() != EVENT_STREAM:
            continue
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    return float(value.strip()) > 0
                except ValueError:
                    return False
        return True
    return False


def parse_chat_body(body: bytes) -> ChatRequest:
    if not body.strip():
        raise InvalidRequest('request body is empty: send a JSON object like {"message": "Hi"}')
    try:
        # Strictly UTF-8: json.loads(bytes) would also take UTF-16/32 and encoded surrogates.
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"request body must be UTF-8 encoded JSON; byte {exc.start} is not valid UTF-8"
        ) from None
    if text.startswith("\ufeff"):
        raise InvalidRequest("request body starts with a byte order mark; send UTF-8 without one")
    _check_depth(body)
    try:
        parsed = _DECODER.decode(text)
    except ValueError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # unreachable past _check_depth; a 400 all the same
        raise _too_deep() from None
    if not isinstance(parsed, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {_json_type(parsed)}")

    message = parsed.get("message")
    if message is None:
        raise InvalidRequest("message is required: a non-empty string")
    if not isinstance(message, str):
        raise InvalidRequest(f"message must be a string, got {_json_type(message)}")
    if not message.strip():
        raise InvalidRequest("message must not be empty")

    for name in parsed:
        if name != "session_id" and folded(name).strip() == "session_id":
            # Names are matched exactly: a variant would go upstream unnamespaced, and would
            # name a session there should upstream ever normalise field names.
            raise InvalidRequest(
                f"field {name[:40]!r} is not session_id: field names are matched exactly"
            )
    session_id = parsed.get("session_id")
    if session_id is not None:
        if not isinstance(session_id, str):
            raise InvalidRequest(f"session_id must be a string, got {_json_type(session_id)}")
        if not 0 < len(session_id) <= MAX_SESSION_ID or not session_id.isprintable():
            raise InvalidRequest(f"session_id must be 1 to {MAX_SESSION_ID} printable characters")

    stream = parsed.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest(f"stream must be true or false, got {_json_type(stream)}")
    return ChatRequest(
        message=message, session_id=session_id, stream=bool(stream), body=body, fields=parsed
    )


def folded(text: str) -> str:
    """`text` as anything that normalises would see it: Unicode compatibility forms folded
    (NFKC: fullwidth `\uff47\uff57\uff1a` is `gw:`) and case folded."""
    return unicodedata.normalize("NFKC", text).casefold()


def _check_depth(body: bytes) -> None:
    """Refuse nesting deeper than MAX_DEPTH before the (recursive) parser sees it.

    Strings are cut out the way the parser reads them, so brackets inside them do not count;
    on a body that is not JSON the count may be off only after the point the parser fails.
    Everything runs in C: linear, and nothing at all for a body with few brackets.
    """
    if body.count(b"[") + body.count(b"{") <= MAX_DEPTH:
        return
    steps = _JSON_STRING.sub(b"", body).translate(_BRACKET_STEPS, _NOT_BRACKETS)
    if max(accumulate(memoryview(steps).cast("b")), default=0) > MAX_DEPTH:
        raise _too_deep()


def _too_large(max_bytes: int) -> RequestTooLarge:
    return RequestTooLarge(
        f"request body is larger than {max_bytes} bytes (limits.max_body_bytes); send less"
    )


def _too_deep() -> InvalidRequest:
    return InvalidRequest(
        f"request body is nested too deeply: at most {MAX_DEPTH} levels of arrays and objects"
    )


def _object_without_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # With a key given twice, the gateway and upstream could each read a different value.
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise InvalidRequest(
                    f"request body has the key {_field_name(key)} more than once; send each "
                    "field once"
                )
            seen.add(key)
    return result


def _field_name(key: str) -> str:
    if _PLAIN_NAME.fullmatch(key) and not key.lower().startswith(_KEY_PREFIXES):
        return repr(key)
    return "(a name not shown here)"


def _refuse_constant(name: str) -> object:
    raise InvalidRequest(f"request body is not valid JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidRequest(
            "request body has a number too large for a 64-bit float; send a smaller number"
        )
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise InvalidRequest(
            f"request body has an integer of more than {MAX_INT_DIGITS} digits; send a "
            "smaller number"
        )
    return int(text)


# Built once (json.loads with hooks would build a decoder per call); it holds no state.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_object_without_duplicates,
    parse_constant=_refuse_constant,
    parse_float=_finite_float,
    parse_int=_bounded_int,
)
