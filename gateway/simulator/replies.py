"""The simulated agent's deterministic replies, their token counts and their wire shapes.

Replies quote the message and the earlier turns, so a test can see session memory (and its
absence) in the text itself. Token counts follow the usual ~4 characters per token, plus a
fixed context cost per earlier turn, so later turns cost more as they would upstream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import UsageFormat
from .sessions import Turn

CONTEXT_TOKENS_PER_TURN = 16
MIN_PIECES = 3
MAX_PIECES = 12
WORDS_PER_PIECE = 3

# A word with the whitespace before it, like the documented pieces `" hours are Monday"`.
_WORD = re.compile(r"\s*\S+")


@dataclass(frozen=True, slots=True)
class Reply:
    text: str
    session_id: str
    input_tokens: int
    output_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def usage(self) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
        }


def count_tokens(text: str) -> int:
    return max(1, -(-len(text) // 4))


def compose_reply(agent_id: str, message: str, turn: Turn) -> Reply:
    text = (
        f'[{agent_id}] You said: "{message}". '
        f"This is turn {turn.number} of session {turn.session_id}"
    )
    if turn.earlier:
        text += "; earlier you said: " + ", ".join(f'"{quote}"' for quote in turn.earlier)
    text += "."
    return Reply(
        text=text,
        session_id=turn.session_id,
        input_tokens=count_tokens(message) + CONTEXT_TOKENS_PER_TURN * (turn.number - 1),
        output_tokens=count_tokens(text),
    )


def split_reply(text: str) -> list[str]:
    """Cut the reply into MIN_PIECES..MAX_PIECES non-empty pieces that join back to it."""
    words = _WORD.findall(text)
    if len(words) < MIN_PIECES:
        # Too few words to split on word boundaries: cut by characters instead.
        words = list(text)
    if len(words) < MIN_PIECES:
        return [text]
    tail = text[sum(len(word) for word in words) :]
    count = min(MAX_PIECES, max(MIN_PIECES, len(words) // WORDS_PER_PIECE))
    pieces = [
        "".join(words[len(words) * index // count : len(words) * (index + 1) // count])
        for index in range(count)
    ]
    pieces[-1] += tail
    return pieces


def json_body(reply: Reply, usage_format: UsageFormat) -> dict[str, object]:
    body: dict[str, object] = {"response": reply.text, "session_id": reply.session_id}
    if usage_format == "tokens_used":
        body["tokens_used"] = reply.total_tokens
    else:
        body["usage"] = reply.usage()
    return body


def done_event(reply: Reply, usage_format: UsageFormat) -> dict[str, object]:
    event: dict[str, object] = {"type": "done", "session_id": reply.session_id}
    if usage_format == "usage":
        event["usage"] = reply.usage()
    else:
        event["tokens_used"] = reply.total_tokens
    return event
