"""`tuplet agent` in a subprocess, as systemd runs it: NOTIFY_SOCKET and WATCHDOG_USEC point
at a test socket, logs are JSON in a file, metrics are scraped over HTTP."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

import confine

#: Set (by ``pytest --agent-confined``) to a unit file: the agent runs under that unit's
#: capability bounding set and read-only root (tests/confine.py).
CONFINE_ENV = "TUPLET_TEST_CONFINE_UNIT"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentProc:
    """The agent in a subprocess, with a notify socket standing in for systemd."""

    def __init__(self, cfg: Path, tmp: Path, watchdog_usec: int = 400_000) -> None:
        self.sock_path = str(tmp / f"notify-{time.monotonic_ns()}")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.sock_path)
        self.port = free_port()
        env = {**os.environ, "NOTIFY_SOCKET": self.sock_path, "WATCHDOG_USEC": str(watchdog_usec)}
        self.log = open(tmp / f"agent-{time.monotonic_ns()}.log", "w+")
        cmd = [sys.executable, "-m", "tuplet.cli", "--config", str(cfg), "--log-format", "json", "agent",
               "--prometheus-serve-addr", f"127.0.0.1:{self.port}"]
        self.unit = Path(env[CONFINE_ENV]) if env.get(CONFINE_ENV) else None
        if self.unit:
            cmd = confine.command(self.unit, cmd)
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.messages: list[str] = []

    def wait_for(self, text: str, timeout: float = 60) -> list[str]:
        """Notifications until one contains ``text``."""
        deadline = time.time() + timeout
        got = []
        while time.time() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.time()))
            try:
                msg = self.sock.recv(4096).decode()
            except socket.timeout:
                break
            got.append(msg)
            self.messages.append(msg)
            if text in msg.split("\n"):
                if text == "READY=1":
                    self.check_confined()
                return got
            if self.proc.poll() is not None:
                break
        raise AssertionError(f"no {text!r} from the agent (got {got}); log:\n{self.logs()}")

    def check_confined(self) -> None:
        """Under --agent-confined: the running agent has exactly the unit's capabilities and a read-only root."""
        if self.unit is None:
            return
        status = dict(line.split(":\t", 1) for line in
                      Path(f"/proc/{self.proc.pid}/status").read_text().splitlines() if ":\t" in line)
        want = confine.capability_mask(confine.capabilities(self.unit))
        assert int(status["CapBnd"], 16) == want and int(status["CapEff"], 16) == want, status
        assert status["NoNewPrivs"].strip() == "1", status
        root = [line.split() for line in Path(f"/proc/{self.proc.pid}/mountinfo").read_text().splitlines()
                if line.split()[4] == "/"]
        assert root and all("ro" in r[5].split(",") for r in root), root

    def logs(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def events(self) -> list[dict]:
        out = []
        for line in self.logs().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def drain(self) -> list[str]:
        """Notifications waiting on the socket, without blocking. Read them while waiting on
        anything else: the agent's sd_notify blocks once the datagram queue (10 by default,
        net.unix.max_dgram_qlen) is full, as it would with a systemd that stopped reading."""
        got = []
        saved = self.sock.gettimeout()
        self.sock.settimeout(0)   # MSG_DONTWAIT alone would still wait out a timeout set by wait_for
        try:
            while True:
                try:
                    got.append(self.sock.recv(4096).decode())
                except BlockingIOError:
                    break
        finally:
            self.sock.settimeout(saved)
        self.messages += got
        return got

    def wait_event(self, name: str, timeout: float = 20, since: int = 0, **fields) -> dict:
        """The first log event ``name`` (after the first ``since`` events) whose fields match."""
        deadline = time.time() + timeout
        while True:
            self.drain()
            for e in self.events()[since:]:
                if e.get("event") == name and all(e.get(k) == v for k, v in fields.items()):
                    return e
            if time.time() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"no {name!r} {fields} from the agent; log:\n{self.logs()}")
            time.sleep(0.1)

    def scrape(self) -> dict[tuple[str, tuple], float]:
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(body) for s in fam.samples}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.sock.close()
        self.log.close()
