"""The command line, including `serve` and `simulate` as the real processes operators run."""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from gateway.__main__ import main
from gateway.auth import hash_key, new_key
from gateway.config import EVENT_LOOP, parse_config
from tests.conftest import ACME_KEY, GLOBEX_KEY, PLATFORM_KEY, SUPPORT_KEY, gateway_yaml
from tests.processes import assert_runs_on, gateway_and_simulator, start
from tests.redis_servers import free_port
from tests.secret_watch import SecretWatch


def test_keys_new_prints_a_key_once_and_an_entry_with_only_its_hash(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["keys", "new", "--tenant", "acme", "--name", "billing-service"]) == 0
    out = capsys.readouterr().out
    key = next(line for line in out.splitlines() if line.startswith("gw_"))
    entry = yaml.safe_load(next(line for line in out.splitlines() if line.startswith("- {")))
    assert entry == [{"name": "billing-service", "sha256": hash_key(key)}]
    assert out.count(key) == 1
    # The printed entry is accepted by the configuration as it stands.
    text = gateway_yaml("http://127.0.0.1:9").replace(
        "keys: [{name: billing-service",
        f"keys: [{{name: x, sha256: {hash_key(key)}}}, {{name: billing-service",
    )
    assert parse_config(text).tenants["acme"].keys[0].sha256 == hash_key(key)


def test_check_config_summarises_a_good_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(gateway_yaml("http://127.0.0.1:9"))
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: OK" in out
    assert "tenant acme: 1 key(s), agents ag_support" in out
    assert PLATFORM_KEY not in out and SUPPORT_KEY not in out


def test_check_config_names_the_problem_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(gateway_yaml("http://127.0.0.1:9").replace("sha256: ", "sha256: 0", 1))
    assert main(["check-config", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:11: tenants.acme.keys[0].sha256: expected 64 hex characters" in err


def test_check_config_refuses_a_second_tenants_block_instead_of_dropping_the_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two files merged into one: PyYAML alone would keep only initech, with a summary "OK".
    path = tmp_path / "gw.yaml"
    path.write_text(
        gateway_yaml("http://127.0.0.1:9")
        + f"tenants:\n  initech:\n    keys: [{{name: ops, sha256: {'c' * 64}}}]\n"
        + "    agents: [ag_support]\n"
    )
    assert main(["check-config", "--config", str(path)]) == 1
    captured = capsys.readouterr()
    assert f"{path}:17: tenants: defined twice, at lines 9 and 17" in captured.err
    assert "OK" not in captured.out


def test_check_config_refuses_the_admin_port_on_the_caller_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        gateway_yaml("http://127.0.0.1:9") + "listen: {port: 9000}\nadmin: {port: 9000}\n"
    )
    assert main(["check-config", "--config", str(path)]) == 1
    assert f"{path}:18: admin.port: 9000 is listen.port too (line 17)" in capsys.readouterr().err


def test_check_config_shows_urls_without_their_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    password = "pw-never-shown-7d2a"
    monkeypatch.setenv("REDIS_URL", f"redis://:{password}@127.0.0.1:6379/0")
    path = tmp_path / "gw.yaml"
    path.write_text(
        gateway_yaml(f"http://user:{password}@127.0.0.1:9")
        + "quota: {backend: redis, redis_url: '${REDIS_URL}'}\n"
    )
    assert main(["check-config", "--config", str(path)]) == 0
    captured = capsys.readouterr()
    assert "upstream http://***@127.0.0.1:9 (platform key set)" in captured.out
    assert "quota backend redis at redis://***@127.0.0.1:6379/0," in captured.out
    assert password not in captured.out + captured.err


def test_keys_hash_prints_the_hash_of_a_key_read_from_standard_input(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key = new_key()
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{key}\n"))
    assert main(["keys", "hash"]) == 0
    assert capsys.readouterr().out == f"{hash_key(key)}\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["keys", "hash"]) == 1
    assert "keys hash: no key on standard input" in capsys.readouterr().err


def test_config_path_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "from-env.yaml"
    path.write_text(gateway_yaml("http://127.0.0.1:9"))
    monkeypatch.setenv("GATEWAY_CONFIG", str(path))
    assert main(["check-config"]) == 0
    monkeypatch.delenv("GATEWAY_CONFIG")
    assert main(["check-config"]) == 1
    assert "pass --config PATH or set GATEWAY_CONFIG" in capsys.readouterr().err


# --- real processes --------------------------------------------------------------------


@pytest.fixture
async def processes(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """`thinnest-gateway simulate` and `thinnest-gateway serve`, as operators start them."""
    async with gateway_and_simulator(tmp_path) as running:
        yield running.url, running.log


async def test_serve_proxies_json_and_streams_and_stops_cleanly_on_sigterm(
    processes: tuple[str, Path], secret_watch: SecretWatch
) -> None:
    url, log = processes
    headers = {"Authorization": f"Bearer {ACME_KEY}"}
    async with aiohttp.ClientSession(response_class=secret_watch.response_class()) as session:
        chat = f"{url}/v1/agents/ag_support/chat"
        async with session.post(chat, json={"message": "Hi"}, headers=headers) as response:
            assert response.status == 200
            assert (await response.json())["usage"]["total_tokens"] > 0
        async with session.post(
            chat, json={"message": "Hi", "stream": True}, headers=headers
        ) as response:
            body = await response.read()
            assert body.rstrip().endswith(b"}") and b'"type": "done"' in body
        async with session.post(
            chat, json={"message": "Hi"}, headers={"Authorization": "Bearer nope"}
        ) as response:
            assert response.status == 401

    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("event") == "request"]
    assert [line["status"] for line in access][-3:] == [200, 200, 401]
    assert access[-2]["stream"] is True and access[-2]["tokens"]["total"] > 0
    text = log.read_text()
    for secret in (PLATFORM_KEY, SUPPORT_KEY, ACME_KEY, GLOBEX_KEY):
        assert secret not in text


async def test_serve_with_a_bad_config_exits_1_naming_the_problem(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(
        gateway_yaml("http://127.0.0.1:9").replace("${TEST_PLATFORM_KEY}", "${UNSET_VAR_X}")
    )
    log = tmp_path / "gateway.log"
    process = await start("serve", "--config", str(config), env=dict(os.environ), log=log)
    assert await asyncio.wait_for(process.wait(), timeout=15) == 1
    assert "upstream.api_key: environment variable UNSET_VAR_X is not set" in log.read_text()


async def test_serve_by_default_runs_on_uvloop_when_the_speed_extra_installed_it(
    tmp_path: Path,
) -> None:
    """`auto` (THINNEST_GATEWAY_EVENT_LOOP unset) is what an operator without the variable
    gets; the test extras install uvloop."""
    async with gateway_and_simulator(tmp_path, event_loop="auto") as running:
        assert_runs_on("uvloop", running.log)


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("trio", f"{EVENT_LOOP}='trio': expected one of auto, asyncio, uvloop"),
        (
            "uvloop",
            f"{EVENT_LOOP}=uvloop, but uvloop cannot be imported (No module named 'uvloop'): "
            "pip install 'thinnest-gateway[speed]'",
        ),
    ],
    ids=["unknown", "uvloop without the speed extra"],
)
async def test_serve_on_an_event_loop_it_cannot_run_exits_1_naming_it(
    tmp_path: Path, value: str, said: str
) -> None:
    hook = tmp_path / "no_uvloop"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import sys\n"
        "class NoUvloop:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'uvloop' or name.startswith('uvloop.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoUvloop())\n"
    )
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    config = tmp_path / "gw.yaml"
    config.write_text(
        gateway_yaml("http://127.0.0.1:9")
        + f"listen: {{host: 127.0.0.1, port: {free_port()}}}\n"
        + f"admin: {{host: 127.0.0.1, port: {free_port()}}}\n"
    )
    log = tmp_path / "gateway.log"
    env = {**os.environ, "PYTHONPATH": path, EVENT_LOOP: value}
    process = await start("serve", "--config", str(config), env=env, log=log)
    assert await asyncio.wait_for(process.wait(), timeout=15) == 1
    assert f"thinnest-gateway: {said}\n" in log.read_text()


def test_keys_new_refuses_names_that_would_break_the_yaml(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["keys", "new", "--tenant", "acme", "--name", "billing: {x}"]) == 1
    captured = capsys.readouterr()
    assert "--name 'billing: {x}': use letters, digits" in captured.err
    assert "gw_" not in captured.out


def test_keys_new_with_an_expiry_prints_an_entry_the_config_accepts_and_json_for_scripts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = time.time()
    assert main(["keys", "new", "--tenant", "acme", "--name", "reports", "--expires", "90d"]) == 0
    out = capsys.readouterr().out
    (entry,) = yaml.safe_load(next(line for line in out.splitlines() if line.startswith("- {")))
    assert abs(entry["expires"].timestamp() - (before + 90 * 86_400)) < 5
    text = gateway_yaml("http://127.0.0.1:9").replace(
        "keys: [{name: billing-service",
        f"keys: [{{name: reports, sha256: {entry['sha256']},"
        f" expires: {entry['expires']:%Y-%m-%dT%H:%M:%SZ}}}, {{name: billing-service",
    )
    assert parse_config(text).tenants["acme"].keys[0].expires == entry["expires"].timestamp()

    assert (
        main(
            [
                "keys",
                "new",
                "--tenant",
                "acme",
                "--name",
                "reports",
                "--expires",
                "2099-06-30",
                "--json",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["expires"] == "2099-06-30T00:00:00Z"
    assert printed["sha256"] == hash_key(printed["key"])
    assert (printed["tenant"], printed["name"]) == ("acme", "reports")

    for when, problem in (("2020-01-01", "is already past"), ("soon", "expected a duration")):
        assert main(["keys", "new", "--tenant", "acme", "--name", "x", "--expires", when]) == 1
        assert problem in capsys.readouterr().err
