"""Hot reload (SIGHUP): tenants, their keys and limits, and agents' keys change while running.

The file is read and validated in full first; an invalid file changes nothing (logged and
counted). A valid one's tenants, agents, upstream keys and upstream.rate_limits are applied in
one step with no await in between, so every request sees either the old or the new
configuration, never a mix: a removed key is refused from the next request on, requests and
streams in flight finish as they started, and quota buckets keep their levels (they live in
the store by name). Sockets, the rest of upstream, the quota backend, limits and logging are
read once at start-up; a change there is reported as needing a restart.
"""

from __future__ import annotations

import dataclasses

import structlog
from aiohttp import web

from gateway.config import Config, load_config
from gateway.errors import ConfigError
from gateway.state import KEYRING, LIFECYCLE, LIMITER, METRICS, QUOTA, UPSTREAM

log = structlog.get_logger("gateway.reload")

RESTART_ONLY = ("listen", "admin", "upstream", "quota", "logging", "limits", "shutdown_grace")


def reload_config(app: web.Application) -> bool:
    """Re-read the configuration file; True when the new one is in force."""
    lifecycle, metrics = app[LIFECYCLE], app[METRICS]
    running = lifecycle.config
    try:
        new = load_config(running.source)
    except ConfigError as exc:
        metrics.config_reloads.labels("invalid").inc()
        # ConfigError messages name the file and YAML path, never a secret's value.
        log.error("config reload refused, the running configuration stays", error=str(exc))
        return False
    _apply(app, new)
    # Upstream keys and their rate limits are applied with the agents (keys choose buckets).
    applied = dataclasses.replace(
        running,
        tenants=new.tenants,
        agents=new.agents,
        upstream=dataclasses.replace(
            running.upstream,
            api_key=new.upstream.api_key,
            rate_limits=new.upstream.rate_limits,
        ),
    )
    lifecycle.config = applied
    metrics.config_reloads.labels("ok").inc()
    restart = [name for name in RESTART_ONLY if getattr(applied, name) != getattr(new, name)]
    log.info(
        "config reloaded",
        tenants=len(new.tenants),
        keys=sum(len(tenant.keys) for tenant in new.tenants.values()),
        agents=len(new.agents),
        **({"restart_needed_for": restart} if restart else {}),
    )
    return True


def _apply(app: web.Application, new: Config) -> None:
    # No await from here to the end: requests see all of it or none of it.
    app[KEYRING].load(new.tenants)
    app[LIMITER].use_config(new)
    app[QUOTA].use_tenants(new.tenants)
    app[LIMITER].register(app[QUOTA])
    app[UPSTREAM].use_keys(new.agents, new.upstream.api_key)
    app[METRICS].use_config(new)
