"""Hot reload (SIGHUP): tenants, their keys and limits, and agents' keys change while running.

The file is read and validated in full first, and the new tenancy (gateway/tenancy.py: key
ring, tenants with their levels, limits and budgets, upstream keys and their limits, metric
label values) is built from it; an invalid file changes nothing (logged and counted). A valid
one's tenancy replaces the running one in one assignment, so every request sees either the
old or the new configuration, never a mix: a removed key is refused from the next request on,
requests and streams in flight finish as they started, and quota buckets keep their levels
(they live in the store by name). With `listen.tls`, the caller port's certificate and key
files are read again into its live SSLContext (gateway/tls.py) before the swap, so new
connections get a rotated certificate; files that do not load refuse the whole reload, and
the old certificate goes on serving. Sockets (turning TLS on or off too), the rest of upstream,
the quota backend, limits and logging are read once at start-up; a change there is reported as
needing a restart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import structlog
from aiohttp import web

from gateway.config import Config, ListenTLS, Tenant, UpstreamRateLimits, load_config
from gateway.errors import ConfigError
from gateway.state import CERTIFICATE, CONFIG, METRICS, TENANCY
from gateway.tenancy import Tenancy

log = structlog.get_logger("gateway.reload")

RESTART_ONLY = (
    "listen",
    "admin",
    "upstream",
    "quota",
    "logging",
    "limits",
    "streams",
    "shutdown_grace",
    "tracing",
)


def reload_config(app: web.Application) -> bool:
    """Re-read the configuration file; True when the new one is in force."""
    started, metrics = app[CONFIG], app[METRICS]
    try:
        new = load_config(started.source)
    except ConfigError as exc:
        metrics.config_reloads.labels("invalid").inc()
        # ConfigError messages name the file and YAML path, never a secret's value.
        log.error("config reload refused, the running configuration stays", error=str(exc))
        return False
    certificate = app.get(CERTIFICATE)
    reloaded: dict[str, str] = {}
    if certificate is not None and new.listen.tls is not None:
        try:
            certificate.reload(new.listen.tls)
        except OSError as exc:  # changed on disk since the loader read it (ssl.SSLError too)
            metrics.config_reloads.labels("invalid").inc()
            log.error(
                "config reload refused, the running configuration stays",
                error=f"{started.source}: listen.tls: cannot load the certificate and key "
                f"({type(exc).__name__})",
            )
            return False
        reloaded["certificate_sha256"] = certificate.fingerprint
    audit = _changes(app[TENANCY].current.owners.tenants, new.tenants)
    app[TENANCY].current = Tenancy.of(new)  # the one step: no request sees a mix
    metrics.config_reloads.labels("ok").inc()
    restart = [
        name for name in RESTART_ONLY if _start_up_only(started, name) != _start_up_only(new, name)
    ]
    log.info(
        "config reloaded",
        tenants=len(new.tenants),
        keys=sum(len(tenant.keys) for tenant in new.tenants.values()),
        agents=len(new.agents),
        **audit,
        **reloaded,
        **({"restart_needed_for": restart} if restart else {}),
    )
    return True


def _changes(old: Mapping[str, Tenant], new: Mapping[str, Tenant]) -> dict[str, list[str]]:
    """The audit of a reload, by name only (never a hash): tenants and keys (`tenant/key`)
    added, removed or changed (a key is changed by a new hash, limits, budget or expiry; a
    tenant by anything but its keys). Empty lists are left out."""
    found: dict[str, list[str]] = {
        "tenants_added": sorted(set(new) - set(old)),
        "tenants_removed": sorted(set(old) - set(new)),
        "tenants_changed": sorted(
            name
            for name in set(old) & set(new)
            if dataclasses.replace(old[name], keys=()) != dataclasses.replace(new[name], keys=())
        ),
    }
    before = {f"{t.name}/{k.name}": k for t in old.values() for k in t.keys}
    after = {f"{t.name}/{k.name}": k for t in new.values() for k in t.keys}
    found["keys_added"] = sorted(set(after) - set(before))
    found["keys_removed"] = sorted(set(before) - set(after))
    found["keys_changed"] = sorted(
        name for name in set(before) & set(after) if before[name] != after[name]
    )
    return {field: names for field, names in found.items() if names}


_SOME_FILES = ListenTLS("", "")


def _start_up_only(config: Config, section: str) -> object:
    """What of a section only a restart applies: all of it, except upstream's key and rate
    limits (the tenancy's) and which certificate files the caller port reads (whether it
    serves TLS at all is the socket's)."""
    value: object = getattr(config, section)
    if section == "upstream":
        value = dataclasses.replace(config.upstream, api_key=None, rate_limits=UpstreamRateLimits())
    if section == "listen" and config.listen.tls is not None:
        value = dataclasses.replace(config.listen, tls=_SOME_FILES)
    return value
