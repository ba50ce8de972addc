"""A real forward proxy for the egress tests: `tinyproxy` (the Debian package; `make test`
installs it) with a configuration of its own, on a free loopback port, requiring a user and
password. Its log shows every request it forwards: `CONNECT host:port` for an https upstream,
the absolute URI (`POST http://host:port/...`) for an http one.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.redis_servers import _die_with_parent, free_port

START_TIMEOUT = 10.0
USER = "egress"
PASSWORD = "proxy_pw_0451"  # in conftest's SECRETS_IN_PLAY: never in a log or a response


class ForwardProxy:
    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("tinyproxy")
        if binary is None:
            raise RuntimeError("tinyproxy is not installed: `make test` installs it")
        self.port = free_port()
        self.log = workdir / "tinyproxy.log"
        config = workdir / "tinyproxy.conf"
        config.write_text(
            f"Port {self.port}\n"
            "Listen 127.0.0.1\n"
            "Timeout 30\n"
            f'LogFile "{self.log}"\n'
            "LogLevel Connect\n"
            f'PidFile "{workdir / "tinyproxy.pid"}"\n'
            "MaxClients 64\n"
            "Allow 127.0.0.1\n"
            f"BasicAuth {USER} {PASSWORD}\n"
        )
        self._process = subprocess.Popen(
            [binary, "-d", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # tinyproxy dies with the test process
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"tinyproxy exited early: {self.requests()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("tinyproxy did not start listening") from None
                time.sleep(0.02)

    @property
    def url(self) -> str:
        """The proxy's URL with its credentials, as `upstream.proxy` or HTTPS_PROXY take it."""
        return f"http://{USER}:{PASSWORD}@127.0.0.1:{self.port}"

    def requests(self) -> list[str]:
        """The request lines it was asked, in order: `CONNECT 127.0.0.1:4443 HTTP/1.1`, …"""
        if not self.log.exists():
            return []
        marker = "): "
        return [
            line.partition(marker)[2]
            for line in self.log.read_text(errors="replace").splitlines()
            if "Request (file descriptor" in line
        ]

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
