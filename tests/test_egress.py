"""Egress: an HTTPS upstream under a company CA (`upstream.ca_file`, added to the system's trust
store), a real forward proxy (`upstream.proxy`, a URL or `env`), and TLS failures logged with the
host and the error class, once per interval."""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from gateway.__main__ import main
from gateway.config import Secret, parse_config
from gateway.simulator.app import create_simulator_app
from gateway.simulator.config import RateLimitConfig, SimulatorConfig
from gateway.tls import client_context
from tests.conftest import ACME, FakeClock, GatewayFactory, gateway_yaml
from tests.forward_proxy import PASSWORD, ForwardProxy

CHAT = "/v1/agents/ag_support/chat"
BODY = {"message": "Hello through the egress", "session_id": "sess_egress"}
AiohttpServer = Callable[..., Awaitable[TestServer]]
UPSTREAM_FAILED = "upstream connection failed"
PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY")


def served_by(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


async def https_simulator(aiohttp_server: AiohttpServer, ca: trustme.CA) -> str:
    """The simulator served over HTTPS with a certificate `ca` issued; its base URL."""
    config = SimulatorConfig(rate_limit=RateLimitConfig(per_minute=100_000, per_day=1_000_000))
    server = await aiohttp_server(create_simulator_app(config), ssl=served_by(ca))
    url = str(server.make_url("")).rstrip("/")
    assert url.startswith("https://")
    return url


def with_upstream(text: str, **settings: object) -> str:
    """gateway_yaml's text with more keys under `upstream:`."""
    lines = "".join(f"  {key}: {value}\n" for key, value in settings.items())
    return text.replace("  timeouts:", lines + "  timeouts:", 1)


def pem_file(ca: trustme.CA, path: Path) -> str:
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def log_lines(capsys: pytest.CaptureFixture[str], event: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line[:1] == "{"]
    return [line for line in lines if line.get("event") == event]


@pytest.fixture
def company_ca() -> trustme.CA:
    return trustme.CA(organization_name="Company CA")


@pytest.fixture
def no_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
def forward_proxy(tmp_path: Path, no_proxy_variables: None) -> Iterator[ForwardProxy]:
    with ForwardProxy(tmp_path) as proxy:
        yield proxy


# --- a company CA ------------------------------------------------------------------------


async def test_an_upstream_certificate_from_a_company_ca_is_refused_without_ca_file(
    make_gateway: GatewayFactory,
    aiohttp_server: AiohttpServer,
    company_ca: trustme.CA,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Refused (502, never retried), and logged with the host and the certificate error's
    class (gateway/outages.py): once for the three failures, then after the interval with the
    count between."""
    url = await https_simulator(aiohttp_server, company_ca)
    clock = FakeClock()
    gateway = await make_gateway(config=parse_config(gateway_yaml(url)), clock=clock)
    capsys.readouterr()
    for _ in range(3):
        response = await gateway.post(CHAT, json=BODY, headers=ACME)
        assert response.status == 502
        assert (await response.json())["error"]["code"] == "upstream_unavailable"
    [line] = log_lines(capsys, UPSTREAM_FAILED)
    assert line["peer"] == f"127.0.0.1:{URL(url).port}"
    assert line["cause"] == "SSLCertVerificationError"
    assert line["tls"] == "unable to get local issuer certificate"
    assert "repeated" not in line

    clock.advance(61)
    assert (await gateway.post(CHAT, json=BODY, headers=ACME)).status == 502
    [line] = log_lines(capsys, UPSTREAM_FAILED)
    assert line["cause"] == "SSLCertVerificationError" and line["repeated"] == 2


async def test_tls_spoken_to_a_plain_http_port_is_logged_with_its_ssl_reason(
    make_gateway: GatewayFactory, simulator_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    https_to_plain = simulator_url.replace("http://", "https://")
    gateway = await make_gateway(config=parse_config(gateway_yaml(https_to_plain)))
    capsys.readouterr()
    assert (await gateway.post(CHAT, json=BODY, headers=ACME)).status == 502
    [line] = log_lines(capsys, UPSTREAM_FAILED)
    assert (line["cause"], line["tls"]) == ("SSLError", "WRONG_VERSION_NUMBER")


async def test_with_ca_file_it_is_answered_and_the_system_trust_store_still_works(
    make_gateway: GatewayFactory,
    aiohttp_server: AiohttpServer,
    company_ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`ca_file` adds to the system's anchors: with SSL_CERT_FILE standing in for the OS bundle
    (a public CA of the test's own), an upstream under the company CA and one under the
    public CA are both answered by the same configuration; without that bundle the public
    one is refused, so it was the system store that admitted it."""
    public_ca = trustme.CA(organization_name="Public CA")
    bundle = pem_file(public_ca, tmp_path / "system-bundle.pem")
    ca_file = pem_file(company_ca, tmp_path / "company-ca.pem")
    company_url = await https_simulator(aiohttp_server, company_ca)
    public_url = await https_simulator(aiohttp_server, public_ca)

    async def status(url: str) -> int:
        config = parse_config(with_upstream(gateway_yaml(url), ca_file=ca_file))
        gateway = await make_gateway(config=config)
        response = await gateway.post(CHAT, json=BODY, headers=ACME)
        if response.status == 200:
            assert 'You said: \\"Hello through the egress\\"' in await response.text()
        return response.status

    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    assert await status(public_url) == 502
    monkeypatch.setenv("SSL_CERT_FILE", bundle)
    assert await status(company_url) == 200
    assert await status(public_url) == 200
    # The context holds both: the company CA was added to the store, not put in its place.
    subjects = [str(cert["subject"]) for cert in client_context(ca_file).get_ca_certs()]
    assert any("'Company CA'" in subject for subject in subjects)
    assert any("'Public CA'" in subject for subject in subjects)


# --- a real forward proxy ----------------------------------------------------------------


async def test_an_https_upstream_is_reached_through_the_proxy_by_connect(
    make_gateway: GatewayFactory,
    aiohttp_server: AiohttpServer,
    company_ca: trustme.CA,
    forward_proxy: ForwardProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The proxy URL, with its user and password, comes from a secret reference; the proxy's
    log shows the CONNECT, and nothing the gateway says shows the password."""
    url = await https_simulator(aiohttp_server, company_ca)
    monkeypatch.setenv("TEST_PROXY_URL", forward_proxy.url)
    text = with_upstream(
        gateway_yaml(url),
        ca_file=pem_file(company_ca, tmp_path / "ca.pem"),
        proxy="${TEST_PROXY_URL}",
    )
    config = parse_config(text)
    assert config.upstream.proxy == Secret(forward_proxy.url)
    assert PASSWORD not in repr(config)
    gateway = await make_gateway(config=config)
    for _ in range(2):  # the second goes over the same tunnel: one CONNECT
        response = await gateway.post(CHAT, json=BODY, headers=ACME)
        assert response.status == 200
    assert forward_proxy.requests() == [f"CONNECT 127.0.0.1:{URL(url).port} HTTP/1.1"]

    path = tmp_path / "gw.yaml"
    path.write_text(text)
    capsys.readouterr()
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"egress proxy http://***@127.0.0.1:{forward_proxy.port}" in out
    assert PASSWORD not in out


async def test_a_proxy_refusing_the_tunnel_is_a_502_that_never_shows_its_password(
    make_gateway: GatewayFactory,
    aiohttp_server: AiohttpServer,
    company_ca: trustme.CA,
    forward_proxy: ForwardProxy,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Wrong user, right password: the proxy refuses the CONNECT, aiohttp's error carries the
    proxy URL with the password, and neither the answer nor the log does (the secret watch
    searches both)."""
    url = await https_simulator(aiohttp_server, company_ca)
    wrong_user = forward_proxy.url.replace("egress:", "nobody:")
    text = with_upstream(
        gateway_yaml(url), ca_file=pem_file(company_ca, tmp_path / "ca.pem"), proxy=wrong_user
    )
    gateway = await make_gateway(config=parse_config(text))
    response = await gateway.post(CHAT, json=BODY, headers=ACME)
    assert response.status == 502
    error = (await response.json())["error"]
    assert error["code"] == "upstream_unavailable"
    assert error["message"].startswith("the egress proxy refused the connection")
    assert PASSWORD not in capsys.readouterr().err
    assert forward_proxy.requests() == [f"CONNECT 127.0.0.1:{URL(url).port} HTTP/1.1"]


async def test_an_http_upstream_is_reached_through_the_proxy_by_absolute_uri(
    make_gateway: GatewayFactory,
    simulator: TestClient[Any, Any],
    simulator_url: str,
    forward_proxy: ForwardProxy,
) -> None:
    gateway = await make_gateway(
        config=parse_config(with_upstream(gateway_yaml(simulator_url), proxy=forward_proxy.url))
    )
    response = await gateway.post(CHAT, json=BODY, headers=ACME)
    assert response.status == 200
    assert forward_proxy.requests() == [f"POST {simulator_url}{CHAT} HTTP/1.1"]
    [seen] = await (await simulator.get("/_sim/requests")).json()
    assert seen["usage"] is not None  # upstream ran the turn the proxy carried


async def test_proxy_env_takes_https_proxy_and_honours_no_proxy(
    make_gateway: GatewayFactory,
    aiohttp_server: AiohttpServer,
    company_ca: trustme.CA,
    forward_proxy: ForwardProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = await https_simulator(aiohttp_server, company_ca)
    ca_file = pem_file(company_ca, tmp_path / "ca.pem")
    config = parse_config(with_upstream(gateway_yaml(url), ca_file=ca_file, proxy="env"))
    assert config.upstream.proxy == "env"
    gateway = await make_gateway(config=config)
    connect = f"CONNECT 127.0.0.1:{URL(url).port} HTTP/1.1"

    monkeypatch.setenv("HTTPS_PROXY", forward_proxy.url)
    assert (await gateway.post(CHAT, json=BODY, headers=ACME)).status == 200
    assert forward_proxy.requests() == [connect]

    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    assert (await gateway.post(CHAT, json=BODY, headers=ACME)).status == 200
    assert forward_proxy.requests() == [connect]  # straight to upstream this time


async def test_without_proxy_the_environment_is_not_read(
    make_gateway: GatewayFactory,
    simulator_url: str,
    forward_proxy: ForwardProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Today's behaviour stays the default: HTTP_PROXY set for other programs is ignored."""
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    gateway = await make_gateway()
    assert (await gateway.post(CHAT, json=BODY, headers=ACME)).status == 200
    assert forward_proxy.requests() == []
