"""Upstream circuit breakers, one per (upstream key, agent): a failing or slow agent opens its
own circuit and no one else's.

    send(agent, tenant) ──▶ Circuits.for_agent(agent) ──▶ Circuit (its key's, its agent's)
                                                            ├─ connect failure, 5xx: counts
                                                            └─ first-byte timeout: counts only
                                                               with another tenant's timeout
                                                               in the last TIMEOUT_WINDOW s

Why the timeout rule: a first-byte timeout is as often the caller's own long request (a big
prompt, a slow tool) as a sick agent. Counted alone, one tenant's six slow requests opened the
circuit for every tenant. Counted only when at least two distinct tenants timed out on the same
agent within the window, a hung agent still opens its circuit once two tenants meet it, and no
tenant can open it for the others by itself. Connection failures and 5xx are upstream's own
doing whoever asked, so they count as they come.

Bounded: one circuit per agent the configuration names, plus one, `other`, for every agent a
tenant reaches through the platform key (`agents: ["*"]`) without naming it. A circuit is kept
for as long as its agent's key stays the same; a reload that changes the key starts it afresh.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import structlog

from gateway.breaker import BreakerState, CircuitBreaker
from gateway.config import Breaker, Secret

OTHER = "other"
"""The circuit (and metric label) of agents the configuration does not name."""
TIMEOUT_WINDOW = 60.0
"""Seconds within which first-byte timeouts of two distinct tenants open a circuit."""

log = structlog.get_logger("gateway.upstream")


class Circuit:
    """One (upstream key, agent) breaker, with the first-byte timeout rule above."""

    __slots__ = ("_clock", "_timeouts", "breaker", "key_id")

    def __init__(self, breaker: CircuitBreaker, key_id: str, clock: Callable[[], float]) -> None:
        self.breaker = breaker
        self.key_id = key_id
        self._clock = clock
        self._timeouts: dict[str, float] = {}  # tenant → its last first-byte timeout

    def allow(self) -> bool:
        return self.breaker.allow()

    def success(self) -> None:
        self.breaker.success()

    def failure(self) -> None:
        """A connection failure or a 5xx."""
        self.breaker.failure()

    def timed_out(self, tenant: str) -> None:
        """A first-byte timeout: a failure only once another tenant timed out recently too."""
        now = self._clock()
        self._timeouts[tenant] = now
        # Bounded by the configured tenants, and pruned to the window.
        for name, at in list(self._timeouts.items()):
            if now - at > TIMEOUT_WINDOW:
                del self._timeouts[name]
        if len(self._timeouts) >= 2:
            self.breaker.failure()


def key_id(key: Secret | None) -> str:
    """A key's identity, never the key: enough to see that a reload changed it."""
    return "" if key is None else hashlib.sha256(key.reveal().encode()).hexdigest()[:16]


class Circuits:
    """Every agent's circuit, made on first use."""

    def __init__(
        self,
        config: Breaker,
        *,
        peer: str,
        agents: Callable[[], frozenset[str]],
        clock: Callable[[], float],
    ) -> None:
        """`agents` reads the configured agent ids in force (a reload may change them)."""
        self._config = config
        self._peer = peer
        self._agents = agents
        self._clock = clock
        self._circuits: dict[str, Circuit] = {}

    def label(self, agent_id: str) -> str:
        return agent_id if agent_id in self._agents() else OTHER

    def for_agent(self, agent_id: str, key: Secret | None) -> Circuit:
        label, identity = self.label(agent_id), key_id(key)
        circuit = self._circuits.get(label)
        if circuit is None or circuit.key_id != identity:
            breaker = CircuitBreaker(
                threshold=self._config.failures,
                cooldown=self._config.cooldown,
                clock=self._clock,
                on_change=lambda before, after: self._changed(label, after),
            )
            circuit = self._circuits[label] = Circuit(breaker, identity, self._clock)
        return circuit

    def states(self) -> Iterator[tuple[str, bool]]:
        """(agent label, open or probing) of every configured agent, and of `other` if used."""
        agents = self._agents()
        for label in sorted(agents | ({OTHER} if OTHER in self._circuits else set())):
            circuit = self._circuits.get(label)
            yield label, circuit is not None and circuit.breaker.state != "closed"

    def _changed(self, agent: str, after: BreakerState) -> None:
        if after == "open":
            log.warning(
                "upstream circuit opened",
                peer=self._peer,
                agent=agent,
                failures=self._config.failures,
                cooldown_s=self._config.cooldown,
            )
        else:
            log.info("upstream circuit closed", peer=self._peer, agent=agent)
