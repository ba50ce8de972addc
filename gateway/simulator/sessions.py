"""Conversation memory, keyed by session_id alone.

The documents do not say whether upstream scopes a session to the key, agent or account that
created it. The simulator takes the worst case on purpose: anyone who knows the id continues
the conversation, so the gateway's per-tenant session namespacing can be shown to be necessary.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass

REMEMBERED_MESSAGES = 3
QUOTE_LIMIT = 200


@dataclass(frozen=True, slots=True)
class Turn:
    session_id: str
    number: int
    earlier: tuple[str, ...]
    """Up to REMEMBERED_MESSAGES earlier messages, oldest first, each cut to QUOTE_LIMIT."""


@dataclass(slots=True)
class _Session:
    turns: int
    recent: deque[str]


class SessionStore:
    """A least-recently-used map, so memory stays flat however many sessions a benchmark opens."""

    __slots__ = ("_max_sessions", "_sessions")

    def __init__(self, max_sessions: int) -> None:
        self._max_sessions = max_sessions
        self._sessions: OrderedDict[str, _Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    @staticmethod
    def new_id() -> str:
        return f"sess_{secrets.token_hex(12)}"

    def advance(self, session_id: str, message: str) -> Turn:
        """Record one more user message in the session and say which turn it is."""
        session = self._sessions.get(session_id)
        if session is None:
            session = _Session(turns=0, recent=deque(maxlen=REMEMBERED_MESSAGES))
            self._sessions[session_id] = session
            if len(self._sessions) > self._max_sessions:
                self._sessions.popitem(last=False)
        else:
            self._sessions.move_to_end(session_id)
        earlier = tuple(session.recent)
        session.turns += 1
        session.recent.append(_quote(message))
        return Turn(session_id=session_id, number=session.turns, earlier=earlier)

    def clear(self) -> None:
        self._sessions.clear()


def _quote(message: str) -> str:
    # Stored messages are cut so 10,000 sessions of huge messages cannot exhaust memory.
    return message if len(message) <= QUOTE_LIMIT else message[: QUOTE_LIMIT - 1] + "…"
