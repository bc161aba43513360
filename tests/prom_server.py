"""The Debian ``prometheus`` server in a subprocess for tests: 127.0.0.1 on a free port, its own
config, rules and storage in a temporary directory (removed on close), short intervals."""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, TypeVar

from agent_harness import free_port

PROMETHEUS = shutil.which("prometheus")
T = TypeVar("T")


class PromServer:
    def __init__(self, targets: list[str], rules: str, interval: str = "1s") -> None:
        if PROMETHEUS is None:
            raise RuntimeError("prometheus missing: `make prom-deps` installs it")
        self.dir = Path(tempfile.mkdtemp(prefix="tuplet-prom-"))
        (self.dir / "rules.yml").write_text(rules)
        cfg = {"global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
               "rule_files": [str(self.dir / "rules.yml")],
               "scrape_configs": [{"job_name": "tuplet", "static_configs": [{"targets": targets}]}]}
        (self.dir / "prometheus.yml").write_text(json.dumps(cfg))   # JSON is YAML
        self.port = free_port()
        self.log = open(self.dir / "prometheus.log", "w+")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.console.templates=/nonexistent",
             "--web.console.libraries=/nonexistent"],
            stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self.wait(lambda: self._ready(), timeout=60, what="prometheus ready")
        except BaseException:
            self.close()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited {self.proc.returncode}:\n{self.logs()}")
        try:
            return bool(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2).status == 200)
        except OSError:
            return False

    def logs(self) -> str:
        self.log.flush()
        return (self.dir / "prometheus.log").read_text()

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{path} {params}: HTTP {e.code}: {e.read().decode()}") from None
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise RuntimeError(f"{expr}: {data['resultType']}")
        return list(data["result"])

    def alerts(self) -> dict[str, list[dict[str, Any]]]:
        """Active alerts by name (each with labels and state: pending or firing)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for a in self.api("alerts")["alerts"]:
            out.setdefault(a["labels"]["alertname"], []).append(a)
        return out

    def wait(self, fn: Callable[[], T], timeout: float, what: str) -> T:
        """fn() until it returns something true, at most ``timeout`` seconds."""
        deadline = time.time() + timeout
        while True:
            got = fn()
            if got:
                return got
            if time.time() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; prometheus log:\n"
                                     + self.logs()[-3000:])
            time.sleep(0.25)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
