"""Real processes for scale-out tests: ``loraserve-server`` replicas and an HAProxy started from
the shipped ``deploy/haproxy/haproxy.cfg`` (only its addresses rewritten), all on loopback.

    replica = Replica.start(model, adapters_dir, log_dir / "r1.log")   # python -m server
    replica.wait_ready()             # model loaded; .port and .metrics_port known
    replica.requests()               # {(adapter, code): count} from its /metrics
    balancer = HAProxy.start(cfg_text, [r.port for r in replicas], log)
    balancer.server_states()         # {"replica1": "UP", ...} from HAProxy's stats CSV

Each process writes its log to a file (a pipe nobody reads would block it); ``stop()`` ends
only the process this object started and returns its exit status.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.serving import wait_for

ROOT = Path(__file__).resolve().parents[1]
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> str:
    return urllib.request.urlopen(url, timeout=5).read().decode()


def request_counts(metrics_text: str) -> dict[tuple[str, str], float]:
    """``loraserve_requests_total`` samples as {(adapter, code): value}."""
    pattern = r'^loraserve_requests_total\{adapter="([^"]*)",code="([^"]*)"\} (\S+)$'
    return {(a, c): float(v) for a, c, v in re.findall(pattern, metrics_text, re.M)}


class Replica:
    def __init__(self, proc: subprocess.Popen, log: Path):
        self.proc = proc
        self.log = log
        self.port: int | None = None
        self.metrics_port: int | None = None

    @classmethod
    def start(cls, model: Path, adapters: Path, log: Path, *extra: str) -> Replica:
        args = [
            sys.executable, "-m", "server", "--model", str(model), "--adapters", str(adapters),
            "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--device", "cpu",
            "--max-lora-rank", "8", "--max-seq-len", "64", *extra,
        ]  # fmt: skip
        # One torch thread each: three replicas share a small CI machine.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with open(log, "w") as out:
            proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        return cls(proc, log)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60) -> Replica:
        """Wait for the "metrics on" log line (written once the model is loaded)."""

        def ready():
            text = self.log.read_text()
            if self.proc.poll() is not None:
                raise AssertionError(f"replica exited with {self.proc.returncode}:\n{text}")
            grpc_port = re.search(r"listening on [\d.]+:(\d+)", text)
            metrics = re.search(r"metrics on http://[\d.]+:(\d+)/metrics", text)
            return grpc_port and metrics and (int(grpc_port[1]), int(metrics[1]))

        self.port, self.metrics_port = wait_for(ready, timeout=timeout, interval=0.1)
        return self

    def requests(self) -> dict[tuple[str, str], float]:
        return request_counts(scrape(f"http://127.0.0.1:{self.metrics_port}/metrics"))

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM (drain), then SIGKILL if it is still there after ``timeout`` seconds."""
        self.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=5)


def render_haproxy_cfg(cfg: str, replica_ports: list[int], frontend: int, stats: int) -> str:
    """The shipped config with its listeners and replica addresses moved onto loopback."""
    names = re.findall(r"^\s*server \S+ (\S+:50051)", cfg, re.M)
    assert len(names) == len(replica_ports), (names, replica_ports)
    for name, port in zip(names, replica_ports):
        cfg = cfg.replace(f" {name} ", f" 127.0.0.1:{port} ")
    for old, new in ((":8080", frontend), (":8404", stats)):
        assert f"bind {old}" in cfg, old
        cfg = cfg.replace(f"bind {old}", f"bind 127.0.0.1:{new}")
    return cfg


class HAProxy:
    def __init__(self, proc: subprocess.Popen, port: int, stats_port: int, log: Path):
        self.proc = proc
        self.port = port
        self.stats_port = stats_port
        self.log = log

    @classmethod
    def start(cls, binary: str, replica_ports: list[int], workdir: Path) -> HAProxy:
        port, stats = free_port(), free_port()
        cfg = workdir / "haproxy.cfg"
        cfg.write_text(render_haproxy_cfg(HAPROXY_CFG.read_text(), replica_ports, port, stats))
        log = workdir / "haproxy.log"
        with open(log, "w") as out:
            # -db: stay in the foreground, so this Popen is HAProxy itself
            proc = subprocess.Popen(
                [binary, "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT
            )
        return cls(proc, port, stats, log)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def server_states(self) -> dict[str, str]:
        """{server name: status} for the loraserve backend, e.g. {"replica1": "UP"}."""
        try:
            csv = scrape(f"http://127.0.0.1:{self.stats_port}/stats;csv")
        except OSError:
            return {}
        header, *rows = [line.split(",") for line in csv.splitlines()]
        status = header.index("status")
        return {r[1]: r[status] for r in rows if r[0] == "loraserve" and r[1].startswith("replica")}

    def wait_states(self, expected: dict[str, str], timeout: float = 15) -> None:
        def reached():
            if self.proc.poll() is not None:
                raise AssertionError(f"haproxy exited:\n{self.log.read_text()}")
            return self.server_states() == expected

        try:
            wait_for(reached, timeout=timeout, interval=0.1)
        except AssertionError as err:
            raise AssertionError(f"{err}; states {self.server_states()}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
