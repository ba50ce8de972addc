"""What a chat request must be before anything goes upstream."""

from __future__ import annotations

import json
from dataclasses import dataclass

from aiohttp import web

from gateway.errors import InvalidRequest, RequestTooLarge

MAX_SESSION_ID = 256


@dataclass(frozen=True, slots=True)
class ChatRequest:
    message: str
    session_id: str | None
    stream: bool
    body: bytes  # exactly what the caller sent; forwarded unchanged


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "a number"
    )


async def read_chat_request(request: web.Request, max_bytes: int) -> ChatRequest:
    content_type = request.headers.get("Content-Type")
    if content_type is not None:
        mime = content_type.partition(";")[0].strip().lower()
        if mime != "application/json" and not mime.endswith("+json"):
            raise InvalidRequest(
                f"Content-Type must be application/json, got {mime[:64] or 'nothing'!r}"
            )
    too_large = RequestTooLarge(
        f"request body is larger than {max_bytes} bytes (limits.max_body_bytes); send less"
    )
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    return parse_chat_body(body)


def parse_chat_body(body: bytes) -> ChatRequest:
    if not body.strip():
        raise InvalidRequest('request body is empty: send a JSON object like {"message": "Hi"}')
    try:
        parsed = json.loads(body)
    except UnicodeDecodeError:
        raise InvalidRequest("request body is not valid UTF-8") from None
    except ValueError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {_json_type(parsed)}")

    message = parsed.get("message")
    if message is None:
        raise InvalidRequest("message is required: a non-empty string")
    if not isinstance(message, str):
        raise InvalidRequest(f"message must be a string, got {_json_type(message)}")
    if not message.strip():
        raise InvalidRequest("message must not be empty")

    session_id = parsed.get("session_id")
    if session_id is not None:
        if not isinstance(session_id, str):
            raise InvalidRequest(f"session_id must be a string, got {_json_type(session_id)}")
        if not 0 < len(session_id) <= MAX_SESSION_ID or not session_id.isprintable():
            raise InvalidRequest(f"session_id must be 1 to {MAX_SESSION_ID} printable characters")

    stream = parsed.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest(f"stream must be true or false, got {_json_type(stream)}")
    return ChatRequest(message=message, session_id=session_id, stream=bool(stream), body=body)
