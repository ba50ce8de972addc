"""TLS on the caller port (`listen.tls`): real clients over HTTPS, and a certificate rotated on
disk served to new connections after a reload, without a restart."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from gateway.app import create_app
from gateway.auth import hash_key
from gateway.config import load_config, parse_config
from gateway.errors import ConfigError
from gateway.reload import reload_config
from gateway.state import CERTIFICATE, METRICS
from tests.conftest import ACME, ACME_KEY, gateway_yaml
from tests.processes import gateway_and_simulator
from tests.secret_watch import SecretWatch
from tests.test_examples import run_node
from tests.test_lifecycle import sighup

AiohttpServer = Callable[..., Awaitable[TestServer]]
CHAT = "/v1/agents/ag_support/chat"
BODY = {"message": "Hello over TLS", "session_id": "sess_tls"}
NEW = "gw_test_acme_rotated_0004"  # a key the reloads below would have let in


class Files:
    """The caller port's certificate and key files, as a secret mount would hold them."""

    def __init__(self, directory: Path, ca: trustme.CA) -> None:
        self.ca = ca
        self.cert = directory / "tls.crt"
        self.key = directory / "tls.key"
        self.ca_pem = directory / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_pem))

    def issue(self) -> str:
        """A new leaf certificate and key written in place; its SHA-256 fingerprint."""
        leaf = self.ca.issue_cert("127.0.0.1", "localhost")
        self.cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(self.key))
        der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
        return hashlib.sha256(der).hexdigest()

    def trusting(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def listen_yaml(self) -> str:
        return f"listen: {{tls: {{cert_file: {self.cert}, key_file: {self.key}}}}}\n"


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path, trustme.CA(organization_name="Caller port CA"))


async def served_fingerprint(port: int, trusting: ssl.SSLContext) -> str:
    """The SHA-256 of the certificate a new connection to `port` is shown."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=trusting)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    return hashlib.sha256(der).hexdigest()


# --- a real `serve`, real clients --------------------------------------------------------


async def test_curl_httpx_and_the_node_example_call_the_gateway_over_https(
    files: Files, tmp_path: Path, secret_watch: SecretWatch
) -> None:
    first = files.issue()
    async with gateway_and_simulator(tmp_path, tls=(files.cert, files.key)) as running:
        assert running.url.startswith("https://")
        started = [line for line in running.log.read_text().splitlines() if '"started"' in line]
        assert json.loads(started[0])["certificate_sha256"] == first

        curl = shutil.which("curl")
        assert curl is not None, "curl is part of every supported machine"
        argv = [curl, "-sS", "--fail-with-body", f"{running.url}{CHAT}"]
        argv += ["-H", f"Authorization: Bearer {ACME_KEY}", "-H", "Content-Type: application/json"]
        argv += ["-d", json.dumps(BODY)]
        untrusted = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
        await untrusted.communicate()
        assert untrusted.returncode == 60  # curl: the peer's certificate is not trusted
        process = await asyncio.create_subprocess_exec(
            *argv, "--cacert", str(files.ca_pem), stdout=asyncio.subprocess.PIPE
        )
        out, _ = await process.communicate()
        assert process.returncode == 0
        secret_watch.search("curl's output", out)
        assert 'You said: \\"Hello over TLS\\"' in out.decode()

        async with httpx.AsyncClient(verify=files.trusting()) as client:
            response = await client.post(f"{running.url}{CHAT}", json=BODY, headers=ACME)
        secret_watch.search("httpx's answer", response.text)
        assert response.status_code == 200 and response.http_version == "HTTP/1.1"

        # The upstream docs' Node example, trusting the CA the way Node is told to.
        out_text = await run_node(
            "chat.mjs", running.url, ACME_KEY, env={"NODE_EXTRA_CA_CERTS": str(files.ca_pem)}
        )
        secret_watch.search("the Node example's output over TLS", out_text)
        assert 'You said: "Hello!"' in out_text

        # Rotated on disk, then SIGHUP: new connections see the new certificate.
        port = int(running.url.rsplit(":", 1)[1])
        assert await served_fingerprint(port, files.trusting()) == first
        second = files.issue()
        async with aiohttp.ClientSession(response_class=secret_watch.response_class()) as session:
            await sighup(session, running, "ok")
        assert await served_fingerprint(port, files.trusting()) == second
        reloaded = [line for line in running.log.read_text().splitlines() if "reloaded" in line]
        assert json.loads(reloaded[-1])["certificate_sha256"] == second
        async with httpx.AsyncClient(verify=files.trusting()) as client:
            response = await client.post(f"{running.url}{CHAT}", json=BODY, headers=ACME)
        assert response.status_code == 200
    assert running.gateway.returncode == 0


# --- reload, in process ------------------------------------------------------------------


async def gateway_over_tls(
    aiohttp_server: AiohttpServer, config_path: Path
) -> tuple[web.Application, int]:
    """create_app on the configuration, served on its own SSLContext as `serve` serves it."""
    app = create_app(load_config(config_path))
    server = await aiohttp_server(app, ssl=app[CERTIFICATE].context)
    assert server.port is not None
    return app, server.port


def reloads(app: web.Application, result: str) -> float:
    value = app[METRICS].registry.get_sample_value(
        "gateway_config_reloads_total", {"result": result}
    )
    return value or 0.0


async def test_a_reload_serves_the_rotated_certificate_to_new_connections_only(
    aiohttp_server: AiohttpServer,
    simulator_url: str,
    files: Files,
    tmp_path: Path,
    secret_watch: SecretWatch,
) -> None:
    """The same SSLContext loads the new chain in place: a connection opened before keeps
    working on the old one."""
    first = files.issue()
    path = tmp_path / "gw.yaml"
    path.write_text(gateway_yaml(simulator_url) + files.listen_yaml())
    app, port = await gateway_over_tls(aiohttp_server, path)
    url = f"https://127.0.0.1:{port}{CHAT}"
    connector = aiohttp.TCPConnector(ssl=files.trusting(), limit=1)
    async with aiohttp.ClientSession(
        connector=connector, response_class=secret_watch.response_class()
    ) as kept_alive:
        async with kept_alive.post(url, json=BODY, headers=ACME) as response:
            assert response.status == 200
        assert await served_fingerprint(port, files.trusting()) == first

        second = files.issue()
        with capture_logs() as logs:
            assert reload_config(app)
        assert await served_fingerprint(port, files.trusting()) == second
        [line] = [entry for entry in logs if entry["event"] == "config reloaded"]
        assert line["certificate_sha256"] == second and "restart_needed_for" not in line
        async with kept_alive.post(url, json=BODY, headers=ACME) as response:
            assert response.status == 200
        assert connector._conns and sum(len(c) for c in connector._conns.values()) == 1


async def test_certificate_files_that_do_not_load_refuse_the_whole_reload(
    aiohttp_server: AiohttpServer, simulator_url: str, files: Files, tmp_path: Path
) -> None:
    """A key that is not the certificate's (a rotation caught half-way): refused and counted
    invalid, the old certificate goes on serving, and the rest of the file is not applied."""
    first = files.issue()
    path = tmp_path / "gw.yaml"
    text = gateway_yaml(simulator_url) + files.listen_yaml()
    path.write_text(text)
    app, port = await gateway_over_tls(aiohttp_server, path)

    old_key = files.key.read_bytes()
    files.issue()
    files.key.write_bytes(old_key)
    path.write_text(text.replace(f"sha256: {hash_key(ACME_KEY)}", f"sha256: {hash_key(NEW)}"))
    with capture_logs() as logs:
        assert not reload_config(app)
    [line] = [entry for entry in logs if entry["event"].startswith("config reload refused")]
    assert "listen.tls: cannot load the certificate and key" in line["error"]
    assert (reloads(app, "ok"), reloads(app, "invalid")) == (0, 1)
    assert await served_fingerprint(port, files.trusting()) == first
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=files.trusting())) as s:
        url = f"https://127.0.0.1:{port}{CHAT}"
        async with s.post(url, json=BODY, headers=ACME) as response:
            assert response.status == 200  # the tenancy did not change either
        async with s.post(url, json=BODY, headers={"Authorization": f"Bearer {NEW}"}) as response:
            assert response.status == 401


async def test_turning_tls_on_or_off_needs_a_restart_new_paths_do_not(
    aiohttp_server: AiohttpServer, simulator_url: str, files: Files, tmp_path: Path
) -> None:
    files.issue()
    path = tmp_path / "gw.yaml"
    path.write_text(gateway_yaml(simulator_url) + files.listen_yaml())
    app, port = await gateway_over_tls(aiohttp_server, path)

    (tmp_path / "moved").mkdir()
    moved = Files(tmp_path / "moved", files.ca)
    third = moved.issue()
    path.write_text(gateway_yaml(simulator_url) + moved.listen_yaml())
    with capture_logs() as logs:
        assert reload_config(app)
    [line] = [entry for entry in logs if entry["event"] == "config reloaded"]
    assert "restart_needed_for" not in line
    assert await served_fingerprint(port, files.trusting()) == third

    path.write_text(gateway_yaml(simulator_url))
    with capture_logs() as logs:
        assert reload_config(app)
    [line] = [entry for entry in logs if entry["event"] == "config reloaded"]
    assert line["restart_needed_for"] == ["listen"]
    assert await served_fingerprint(port, files.trusting()) == third  # still serving TLS


# --- the configuration ---------------------------------------------------------------------


def problem(text: str, line: int | None = None) -> str:
    """The loader's message without its line number (checked against `line` if given)."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "gw.yaml")
    found = re.fullmatch(r"gw\.yaml:(\d+): (.*)", str(info.value), re.DOTALL)
    assert found is not None, str(info.value)
    if line is not None:
        assert int(found[1]) == line
    return f"gw.yaml: {found[2]}"


def test_listen_tls_is_checked_when_the_file_is_loaded(files: Files, tmp_path: Path) -> None:
    base = gateway_yaml("http://127.0.0.1:9")
    files.issue()
    config = parse_config(base + files.listen_yaml())
    assert config.listen.tls is not None and config.listen.tls.cert_file == str(files.cert)

    last = base.count("\n") + 1  # the line `listen:` is appended as
    assert problem(base + f"listen: {{tls: {{cert_file: {files.cert}}}}}\n", last) == (
        "gw.yaml: listen.tls.key_file: is required"
    )
    missing = base + files.listen_yaml().replace(str(files.key), str(tmp_path / "nope.key"))
    assert problem(missing) == (
        f"gw.yaml: listen.tls.key_file: cannot read {tmp_path / 'nope.key'}: "
        "No such file or directory"
    )
    other_key = tmp_path / "other.key"
    files.ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other_key))
    mismatched = base + files.listen_yaml().replace(str(files.key), str(other_key))
    assert problem(mismatched) == (
        "gw.yaml: listen.tls: cannot load the certificate and key: KEY_VALUES_MISMATCH"
    )
    assert problem(base + "admin: {tls: {cert_file: a, key_file: b}}\n") == (
        "gw.yaml: admin.tls: unknown key"
    )


def test_egress_settings_are_checked_and_a_proxy_url_is_never_quoted(tmp_path: Path) -> None:
    def upstream(setting: str) -> str:
        return gateway_yaml("https://127.0.0.1:9").replace(
            "  timeouts:", f"  {setting}\n  timeouts:", 1
        )

    assert parse_config(upstream("proxy: env")).upstream.proxy == "env"
    assert parse_config(gateway_yaml("http://127.0.0.1:9")).upstream.proxy is None
    bad = problem(upstream("proxy: socks5://user:pa55word@proxy:1080"))
    assert bad == (
        "gw.yaml: upstream.proxy: expected env or a proxy URL such as http://proxy.example:3128"
    )
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    assert problem(upstream(f"ca_file: {not_pem}")).startswith(
        "gw.yaml: upstream.ca_file: cannot load trust anchors: "
    )
    assert problem(upstream(f"ca_file: {tmp_path / 'none.pem'}")) == (
        f"gw.yaml: upstream.ca_file: cannot read {tmp_path / 'none.pem'}: No such file or directory"
    )
