"""Real processes for scale-out tests: ``loraserve-server`` replicas and an HAProxy started from
the shipped ``deploy/haproxy/haproxy.cfg`` (only its listeners and DNS server rewritten), all
on loopback.

    replica = Replica.start(model, adapters_dir, log_dir / "r1.log")   # python -m loraserve.server
    replica.wait_ready()             # model loaded; .target and .metrics_port known
    replica.requests()               # {(adapter, code): count} from its /metrics
    dns = DNS(["127.0.0.1", "127.0.0.2"])   # answers every A query with these addresses
    balancer = HAProxy.start(binary, workdir, dns.port, replica_port)
    balancer.server_states()         # {"127.0.0.1:PORT": "UP", ...} from HAProxy's stats CSV

HAProxy finds replicas the way it does under Compose or Kubernetes: A records of one name, one
address per replica, all on the same port. On loopback that means one address of 127.0.0.0/8
per replica (``shared_free_port`` finds a port free on all of them).

Each process writes its log to a file (a pipe nobody reads would block it); ``stop()`` ends
only the process this object started and returns its exit status.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

from tests.serving import serving_compile, wait_for

ROOT = Path(__file__).resolve().parents[1]
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_free_port(hosts: list[str]) -> int:
    """A port nobody listens on at any of ``hosts`` (loopback addresses)."""
    for _ in range(20):
        port = free_port()
        try:
            for host in hosts:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError(f"no port free on all of {hosts}")


class DNS:
    """A DNS server on loopback UDP standing in for Compose's or Kubernetes' DNS: every A query
    is answered with ``addresses`` (assign a new list to scale), any other type with no record.
    ``names`` collects the names asked for."""

    def __init__(self, addresses: list[str]):
        self.addresses = list(addresses)
        self.names: set[str] = set()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                query, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            self.sock.sendto(self.answer(query), peer)

    def answer(self, query: bytes) -> bytes:
        """The reply to a one-question query: header, the question echoed, A records."""
        qid, flags = struct.unpack(">HH", query[:4])
        labels, end = [], 12
        while query[end]:  # the name: length-prefixed labels up to a zero byte
            labels.append(query[end + 1 : end + 1 + query[end]].decode())
            end += 1 + query[end]
        (qtype,) = struct.unpack(">H", query[end + 1 : end + 3])
        self.names.add(".".join(labels))
        addresses = list(self.addresses) if qtype == 1 else []  # 1 = A
        # QR + RD copied + RA, NOERROR; one question, len(addresses) answers
        header = struct.pack(">6H", qid, 0x8080 | (flags & 0x0100), 1, len(addresses), 0, 0)
        records = b"".join(  # name = pointer to the question's (offset 12), A, IN, TTL 1 s
            struct.pack(">HHHIH", 0xC00C, 1, 1, 1, 4) + socket.inet_aton(a) for a in addresses
        )
        return header + query[12 : end + 5] + records

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.sock.close()


def scrape(url: str) -> str:
    return urllib.request.urlopen(url, timeout=5).read().decode()


def request_counts(metrics_text: str) -> dict[tuple[str, str], float]:
    """``loraserve_requests_total`` samples as {(adapter, code): value}, summed over methods."""
    counts: dict[tuple[str, str], float] = {}
    for labels, value in re.findall(
        r"^loraserve_requests_total\{(.*)\} (\S+)$", metrics_text, re.M
    ):
        d = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        key = (d["adapter"], d["code"])
        counts[key] = counts.get(key, 0.0) + float(value)
    return counts


class Replica:
    def __init__(self, proc: subprocess.Popen, log: Path):
        self.proc = proc
        self.log = log
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.metrics_port: int | None = None

    @classmethod
    def start(cls, model: Path, adapters: Path, log: Path, *extra: str) -> Replica:
        """``extra`` flags come last, so ``--host``/``--port`` there override the defaults."""
        args = [
            sys.executable, "-m", "server", "--model", str(model), "--adapters", str(adapters),
            "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--device", "cpu",
            "--max-lora-rank", "8", "--max-seq-len", "64", "--compile", serving_compile(),
            *extra,
        ]  # fmt: skip
        # One torch thread each: three replicas share a small CI machine.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with open(log, "w") as out:
            proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        return cls(proc, log)

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def wait_ready(self, timeout: float = 60) -> Replica:
        """Wait for the "ready: serving" log line (the ports open before the model loads; this
        line comes once it is loaded and health says SERVING)."""

        def ready():
            text = self.log.read_text()
            if self.proc.poll() is not None:
                raise AssertionError(f"replica exited with {self.proc.returncode}:\n{text}")
            listening = re.search(r"listening on ([\d.]+):(\d+)", text)
            metrics = re.search(r"metrics on http://[\d.]+:(\d+)/metrics", text)
            if not (listening and metrics and "ready: serving on" in text):
                return None
            return listening[1], int(listening[2]), int(metrics[1])

        self.host, self.port, self.metrics_port = wait_for(ready, timeout=timeout, interval=0.1)
        return self

    def requests(self) -> dict[tuple[str, str], float]:
        return request_counts(scrape(f"http://{self.host}:{self.metrics_port}/metrics"))

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


def render_haproxy_cfg(
    cfg: str, dns_port: int, replica_port: int, frontend: int, stats: int
) -> str:
    """The shipped config on loopback: listeners on free ports, ``dns_port`` as the resolver,
    replicas on ``replica_port``. The server-template, its name and the checks stay as shipped."""
    assert cfg.count("parse-resolv-conf") == 1
    cfg = cfg.replace("parse-resolv-conf", f"nameserver test 127.0.0.1:{dns_port}")
    template = re.compile(r"^(\s*server-template \S+ \S+ \S+):50051\b", re.M)
    cfg, n = template.subn(rf"\1:{replica_port}", cfg)
    assert n == 1, "one server-template on port 50051"
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
    def start(cls, binary: str, workdir: Path, dns_port: int, replica_port: int) -> HAProxy:
        port, stats = free_port(), free_port()
        cfg = workdir / "haproxy.cfg"
        shipped = HAPROXY_CFG.read_text()
        cfg.write_text(render_haproxy_cfg(shipped, dns_port, replica_port, port, stats))
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

    def slots(self) -> dict[str, tuple[str, str]]:
        """{address: (slot name, status)} for the loraserve backend's slots that DNS filled,
        e.g. {"127.0.0.2:41000": ("replica1", "UP")}; empty slots have no address."""
        try:
            csv = scrape(f"http://127.0.0.1:{self.stats_port}/stats;csv")
        except OSError:
            return {}
        header, *rows = [line.split(",") for line in csv.splitlines()]
        addr, status = header.index("addr"), header.index("status")
        return {
            r[addr]: (r[1], r[status])
            for r in rows
            if r[0] == "loraserve" and r[1].startswith("replica") and r[addr]
        }

    def server_states(self) -> dict[str, str]:
        """{address: status}, e.g. {"127.0.0.1:41000": "UP"}."""
        return {a: status for a, (_, status) in self.slots().items()}

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
