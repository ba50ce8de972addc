"""Command line: `thinnest-gateway serve | check-config | keys new | keys hash | usage |
simulate`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import json
import re
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from gateway import __version__, tracing
from gateway.auth import hash_key, new_key
from gateway.config import NAME_PATTERN, Config, config_path, load_config
from gateway.config_file import mask_url
from gateway.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thinnest-gateway",
        description="API gateway in front of the thinnestAI agent chat API.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="YAML file (default: $GATEWAY_CONFIG)")

    check = commands.add_parser("check-config", help="validate a config file and summarise it")
    check.add_argument("--config", help="YAML file (default: $GATEWAY_CONFIG)")

    keys = commands.add_parser("keys", help="gateway key tools")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    new = key_commands.add_parser("new", help="print a new caller key once, and its YAML entry")
    new.add_argument("--tenant", required=True, help="tenant the key belongs to")
    new.add_argument("--name", required=True, help="name of the calling service")
    new.add_argument(
        "--expires",
        metavar="WHEN",
        help="refused from then on: a duration from now (90d, 12w, 36h) or a date or time "
        "(2027-06-30, 2027-06-30T12:00:00Z)",
    )
    new.add_argument(
        "--json", action="store_true", help="print one JSON object (for scripts and vaults)"
    )
    key_commands.add_parser(
        "hash",
        help="print the sha256 of a key read from standard input (for tenants.*.keys[].sha256)",
        description="Reads one key from standard input (never an argument: it would stay in "
        "the shell's history) and prints the hash the configuration takes.",
    )

    usage = commands.add_parser(
        "usage",
        help="usage report from the ledger, for chargeback",
        description="Tokens and requests charged, per day, tenant, key (service) and agent, "
        "read from the backend the configuration names (Redis; with the memory backend ask "
        "the running gateway: GET /usage on its admin port).",
    )
    usage.add_argument("--config", help="YAML file (default: $GATEWAY_CONFIG)")
    usage.add_argument(
        "--from",
        dest="first",
        metavar="YYYY-MM-DD",
        help="first day, in quota.timezone (default: the 1st of --to's month)",
    )
    usage.add_argument(
        "--to",
        dest="last",
        metavar="YYYY-MM-DD",
        help="last day, inclusive (default: today in quota.timezone)",
    )
    usage.add_argument(
        "--by",
        metavar="COLUMNS",
        help="split rows by any of tenant,key,agent,day, sorted in that order "
        "(default: tenant,key,agent,day)",
    )
    usage.add_argument("--format", choices=("table", "csv", "json"), default="table")

    simulate = commands.add_parser("simulate", help="run a local stand-in for api.thinnest.ai")
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=int, default=9000)
    simulate.add_argument("--config", help="simulator YAML (default: built-in demo agents)")
    simulate.add_argument(
        "--cert-file", help="serve HTTPS with this PEM certificate chain (with --key-file)"
    )
    simulate.add_argument("--key-file", help="the certificate's PEM private key")
    return parser


def _load(given: str | None) -> Config:
    path = config_path(given)
    if path is None:
        raise ConfigError("no configuration: pass --config PATH or set GATEWAY_CONFIG")
    return load_config(path)


def summary(config: Config) -> str:
    """What the file configures, with no secret: keys as set or not, URLs without
    credentials."""
    redis = ", ".join(mask_url(url.reveal()) for url in config.quota.redis_url)
    lines = [
        f"{config.source}: OK",
        f"  listen {config.listen.host}:{config.listen.port}, "
        f"admin {config.admin.host}:{config.admin.port}",
        f"  upstream {mask_url(str(config.upstream.base_url))} "
        f"(platform key {'set' if config.upstream.api_key else 'not set'}), "
        f"{len(config.agents)} agent(s): {', '.join(config.agents) or '-'}",
        f"  quota backend {config.quota.backend}{f' at {redis}' if redis else ''}, "
        f"on_backend_error {config.quota.on_backend_error}",
    ]
    edges = _edges(config)
    if edges:
        lines.insert(3, f"  {edges}")
    lines.append(tracing.describe(config))
    for tenant in config.tenants.values():
        lines.append(
            f"  tenant {tenant.name}: {len(tenant.keys)} key(s), "
            f"agents {', '.join(sorted(tenant.agents))}"
        )
    return "\n".join(lines)


def _edges(config: Config) -> str:
    """TLS and the egress proxy, when set; a proxy URL without its credentials."""
    parts = []
    if config.listen.tls is not None:
        parts.append(f"caller port TLS with {config.listen.tls.cert_file}")
    if config.upstream.ca_file is not None:
        parts.append(f"upstream trusts the system's CAs and {config.upstream.ca_file}")
    proxy = config.upstream.proxy
    if proxy == "env":
        parts.append("egress proxy from HTTPS_PROXY/HTTP_PROXY/NO_PROXY")
    elif proxy is not None:
        parts.append(f"egress proxy {mask_url(proxy.reveal())}")
    return ", ".join(parts)


_DURATION = re.compile(r"(\d+)([hdw])")
_SECONDS = {"h": 3600, "d": 86_400, "w": 7 * 86_400}


def _expiry(when: str, now: float) -> str:
    """`--expires` as the configuration's `expires` value: UTC, to the second."""
    duration = _DURATION.fullmatch(when.strip())
    if duration:
        at = datetime.fromtimestamp(now + int(duration[1]) * _SECONDS[duration[2]], UTC).replace(
            microsecond=0
        )
    else:
        try:
            at = datetime.fromisoformat(when.strip())
        except ValueError:
            raise ConfigError(
                f"--expires {when!r}: expected a duration (90d, 12w, 36h) or a date or time "
                "(2027-06-30, 2027-06-30T12:00:00Z)"
            ) from None
        if at.tzinfo is None:
            if len(when.strip()) > len("2027-06-30"):
                raise ConfigError(f"--expires {when!r}: give the time zone too, e.g. …T12:00:00Z")
            at = at.replace(tzinfo=UTC)  # a date: its start, in UTC, as the config reads it
        at = at.astimezone(UTC)
    if at.timestamp() <= now:
        raise ConfigError(f"--expires {when!r} is already past")
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def _new_key(tenant: str, name: str, expires: str | None, as_json: bool, now: float) -> str:
    for flag, value in (("--tenant", tenant), ("--name", name)):
        if not NAME_PATTERN.fullmatch(value):
            raise ConfigError(f"{flag} {value!r}: use letters, digits, _ . and - (at most 64)")
    until = _expiry(expires, now) if expires is not None else None
    key = new_key()
    entry = {"name": name, "sha256": hash_key(key)} | ({"expires": until} if until else {})
    if as_json:
        return json.dumps({"tenant": tenant, "key": key, **entry}) + "\n"
    fields = ", ".join(f"{field}: {value}" for field, value in entry.items())
    return (
        f"# New gateway key for tenant {tenant}, service {name}. It is shown only this once:\n"
        f"# hand it to the service's secret store; the gateway keeps only its hash.\n"
        f"{key}\n"
        f"\n"
        f"# Add this entry under tenants.{tenant}.keys, then reload or restart the gateway:\n"
        f"- {{{fields}}}\n"
    )


def _hash_key() -> str:
    if sys.stdin.isatty():
        key = getpass.getpass("gateway key (not echoed): ")
    else:
        key = sys.stdin.readline()
    key = key.strip()
    if not key:
        raise ConfigError("keys hash: no key on standard input")
    return hash_key(key) + "\n"


def _usage(args: argparse.Namespace) -> int:
    from gateway import report
    from gateway.logs import configure_logging

    config = _load(args.config)
    try:
        query = report.Query.parse(
            args.first, args.last, args.by, today=report.today(config.quota.timezone, time.time())
        )
    except report.ReportError as exc:
        print(f"thinnest-gateway usage: --{exc.param}: {exc.problem}", file=sys.stderr)
        return 2
    try:
        report.check_readable(config)
        # To stderr, errors only: stdout carries the report, and a failure is explained below.
        configure_logging(dataclasses.replace(config.logging, level="error"))
        result = asyncio.run(report.read(config, query))
    except report.LedgerUnreadable as exc:
        print(f"thinnest-gateway usage: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(report.render(result, args.format))
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from aiohttp import web

    from gateway.config import ListenTLS
    from gateway.simulator import create_simulator_app
    from gateway.simulator import load_simulator_config as load
    from gateway.tls import server_context

    if (args.cert_file is None) != (args.key_file is None):
        print(
            "thinnest-gateway simulate: give --cert-file and --key-file together", file=sys.stderr
        )
        return 2
    try:
        config = load(args.config)
        # Like api.thinnest.ai, HTTPS when given a certificate (tests and the benchmark).
        tls = None if args.cert_file is None else ListenTLS(args.cert_file, args.key_file)
        context = None if tls is None else server_context(tls)
    except (OSError, ValueError) as exc:
        print(f"thinnest-gateway simulate: {exc}", file=sys.stderr)
        return 1
    url = f"{'https' if context else 'http'}://{args.host}:{args.port}"
    # No access log: at benchmark rates it would cost more than the simulated work.
    web.run_app(
        create_simulator_app(config),
        host=args.host,
        port=args.port,
        ssl_context=context,
        access_log=None,
        shutdown_timeout=1.0,
        print=lambda _: print(f"simulator listening on {url}", flush=True),
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "keys" and args.keys_command == "hash":
            sys.stdout.write(_hash_key())
        elif args.command == "keys":
            sys.stdout.write(_new_key(args.tenant, args.name, args.expires, args.json, time.time()))
        elif args.command == "check-config":
            config = _load(args.config)
            tracing.require_sdk(config)
            print(summary(config))
        elif args.command == "serve":
            from gateway.app import serve
            from gateway.logs import configure_logging

            config = _load(args.config)
            tracing.require_sdk(config)
            configure_logging(config.logging)
            serve(config)
        elif args.command == "usage":
            return _usage(args)
        elif args.command == "simulate":
            return _simulate(args)
    except ConfigError as exc:
        print(f"thinnest-gateway: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
