"""Upstream's two key kinds: agent keys (one agent each) and platform keys (every agent)."""

from __future__ import annotations

from .config import SimulatorConfig


class KeyIndex:
    """Answers "may this Authorization header use this agent?" with one dict lookup."""

    __slots__ = ("_agent_of_key", "_platform_keys")

    def __init__(self, config: SimulatorConfig) -> None:
        self._agent_of_key = {
            key: agent_id for agent_id, agent in config.agents.items() for key in agent.keys
        }
        self._platform_keys = frozenset(config.platform_keys)

    def check(self, authorization: str | None, agent_id: str) -> tuple[str | None, str | None]:
        """Return `(key, None)` when allowed, else `(None, reason)` for a 401.

        Whether the agent exists is not decided here: the simulator answers 404 for an unknown
        agent only once the key has proven valid for it (the documents do not say which of 401
        and 404 an agent key for another or an unknown agent gets).
        """
        if not authorization:
            return None, "Missing API key. Send it as 'Authorization: Bearer <key>'."
        key = bearer_token(authorization)
        if key is None:
            return None, "Malformed Authorization header. Expected 'Bearer <key>'."
        if key in self._platform_keys:
            return key, None
        owner = self._agent_of_key.get(key)
        if owner is None:
            return None, "Invalid API key."
        if owner != agent_id:
            return None, "This agent API key is not valid for the requested agent."
        return key, None


def bearer_token(authorization: str | None) -> str | None:
    """The key of a `Bearer <key>` header (scheme in any case), or None."""
    scheme, _, key = (authorization or "").partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None
