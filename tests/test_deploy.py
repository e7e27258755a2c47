"""deploy/: the shipped configs pass the real tools that read them, and the scale-out story works
with real processes.

- promtool checks prometheus.yml and alerts.yml and runs the alert unit tests; every Grafana
  query is valid PromQL (promtool parses it) and names only series a real server exports.
- haproxy -c accepts haproxy.cfg; its gRPC health check (raw HTTP/2 frames) tells SERVING from
  NOT_SERVING on real gRPC health servers, and so does deploy/grpc_health_probe.py, which also
  speaks TLS and mTLS to a real TLS server. HAProxy finds replicas through DNS (a stand-in DNS
  server on loopback): scaling up fills a free slot, scaling down empties one, the others stay.
- Kubernetes manifests, compose file, Dockerfiles and Envoy config are read as data: probes,
  GPU, ports, selectors, volumes, threads, and every server flag they pass parses with the
  real CLI. The images' entrypoint script runs for real (threads, demo-only seeding).
- Three ``python -m loraserve.server`` replicas share one adapters folder behind an HAProxy started
from
  the shipped config (listeners and DNS server rewritten for loopback, replicas found by DNS):
  each adapter lands on exactly one replica, a new file is served through the balancer, and a
  replica stopped with SIGTERM hands its adapters to the others (and only its adapters) with
  no client error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from loraserve.adapters.demo_paths import demo_adapters_dir
from loraserve.adapters.format import write_adapter
from loraserve.client import AdapterNotFoundError, LoraClient
from loraserve.server.__main__ import parse_args
from loraserve.server.app import SERVICE

from tests.grpc_server import ServerThread
from tests.replicas import DNS, HAPROXY_CFG, HAProxy, Replica, shared_free_port
from tests.serving import random_adapter, serving_config, wait_for

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "loraserve.json"
PROBE = DEPLOY / "grpc_health_probe.py"
ENTRYPOINT_SH = DEPLOY / "entrypoint.sh"
LOOPBACK = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]  # one address per replica, as DNS gives


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed; make test installs it")
        pytest.skip(f"{name} not installed (CI installs it)")
    return path


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, **kwargs)


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ------------------------------------------------------------------------------ Prometheus


def test_prometheus_config_and_alert_rules_pass_promtool():
    promtool = tool("promtool")
    for args in (
        ("check", "config", PROMETHEUS / "prometheus.yml"),  # also checks alerts.yml
        ("check", "rules", PROMETHEUS / "alerts.yml"),
        ("test", "rules", PROMETHEUS / "alerts.test.yml"),
    ):
        result = run(promtool, *map(str, args))
        assert result.returncode == 0, result.stdout + result.stderr
    alerts = {
        r["alert"] for g in load_yaml(PROMETHEUS / "alerts.yml")["groups"] for r in g["rules"]
    }
    assert {
        "LoraserveDown",
        "LoraserveHighErrorRate",
        "LoraserveQueueBacklog",
        "LoraserveAdapterFilesRefused",
        "LoraserveHighTimeToFirstToken",
        "LoraserveHighRequestLatency",
    } <= alerts
    tested = {
        case["alertname"]
        for test in load_yaml(PROMETHEUS / "alerts.test.yml")["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert tested == alerts, f"alerts without a firing unit test: {alerts - tested}"


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables replaced by values Prometheus would see."""
    for var, value in (("$__rate_interval", "1m"), ("$__range", "1h"), ("$instance", ".*")):
        expr = expr.replace(var, value)
    return expr


def test_dashboard_queries_are_valid_promql(tmp_path):
    promtool = tool("promtool")
    rules = [
        {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(e)}
        for i, e in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def exported_series(metrics_text: str) -> set[str]:
    """Every series name a /metrics page can carry, from its ``# TYPE`` lines (present even for
    labelled families that have no samples yet): counters as exposed (``..._total``, the page
    names them so), histograms with ``_bucket``/``_sum``/``_count``, gauges as they are."""
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", metrics_text, re.M):
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif kind == "counter":
            names |= {name, name if name.endswith("_total") else f"{name}_total"}
        else:
            names.add(name)
    return names


def referenced_series(exprs: list[str]) -> set[str]:
    return {n for e in exprs for n in re.findall(r"\bloraserve_[a-z0-9_]+", e)}


def test_dashboard_and_alerts_use_only_metrics_the_server_exports(tiny_llama, tmp_path):
    (tmp_path / "ads").mkdir()
    server = ServerThread(serving_config(tiny_llama, tmp_path / "ads", metrics_port=0))
    try:
        url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
        exported = exported_series(urllib.request.urlopen(url, timeout=5).read().decode())
    finally:
        server.stop()
    assert "loraserve_requests_total" in exported
    assert "loraserve_time_to_first_token_seconds_bucket" in exported

    dashboard = referenced_series(dashboard_queries())
    assert dashboard - exported == set(), "dashboard names series the server does not export"
    rules = load_yaml(PROMETHEUS / "alerts.yml")["groups"]
    alerts = referenced_series([r["expr"] for g in rules for r in g["rules"]])
    assert alerts - exported == set(), "alerts name series the server does not export"

    # the dashboard shows what the issue asks for: throughput, latency percentiles, queue,
    # batch size, adapter residency and hit rate, per-adapter traffic, load failures
    assert {
        "loraserve_requests_total",
        "loraserve_generated_tokens_total",
        "loraserve_time_to_first_token_seconds_bucket",
        "loraserve_inter_token_latency_seconds_bucket",
        "loraserve_request_duration_seconds_bucket",
        "loraserve_waiting_requests",
        "loraserve_queue_time_seconds_bucket",
        "loraserve_batch_size_bucket",
        "loraserve_adapters_resident",
        "loraserve_adapter_cache_hits_total",
        "loraserve_adapter_cache_misses_total",
        "loraserve_adapter_loads_total",
        "loraserve_adapters_invalid",
    } <= dashboard
    assert any("by (adapter" in e for e in dashboard_queries())
    assert any('result!="ok"' in e for e in dashboard_queries())
    assert any("histogram_quantile(0.99" in e for e in dashboard_queries())


def test_grafana_provisioning_points_at_the_dashboard_and_datasource():
    datasource = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")
    (ds,) = datasource["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {
        t["datasource"]["uid"]
        for p in dashboard["panels"]
        if p["type"] != "row"
        for t in [p, *p["targets"]]
    }
    assert uids == {ds["uid"]}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))

    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/loraserve.yaml")
    (prov,) = provider["providers"]
    grafana = load_yaml(DEPLOY / "compose.yaml")["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["./grafana/dashboards"] == prov["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


# ------------------------------------------------------------------------------ HAProxy


def test_haproxy_config_is_valid_and_hashes_the_adapter_header():
    haproxy = tool("haproxy")
    result = run(haproxy, "-c", "-f", str(HAPROXY_CFG))
    assert result.returncode == 0, result.stdout + result.stderr
    cfg = HAPROXY_CFG.read_text()
    backend = cfg.split("backend loraserve", 1)[1].split("\nfrontend", 1)[0]
    assert "balance hdr(x-lora-adapter)" in backend
    assert "hash-type consistent" in backend
    assert re.search(r"bind :8080 proto h2\b", cfg)
    assert re.search(r"default-server proto h2 check\b", backend)
    assert re.search(r"^\s*retries [1-9]", cfg, re.M) and "option redispatch" in cfg
    # replicas come from DNS, through a resolvers section that exists; none is listed by hand
    assert not re.search(r"^\s*server ", backend, re.M)
    assert re.search(r"^\s*server-template replica 1-\d+ ", backend, re.M)
    (resolvers,) = re.findall(r"default-server .*\bresolvers (\S+)", backend)
    assert re.search(rf"^resolvers {resolvers}$", cfg, re.M)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def health_server():
    """``health_server(host, port, status)`` starts a gRPC server with only the health service
    and returns its servicer (``.set(SERVICE, status)`` changes the answer)."""
    started = []

    def start(host: str, port: int, status=SERVING) -> health.HealthServicer:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        assert server.add_insecure_port(f"{host}:{port}") == port
        server.start()
        servicer.set(SERVICE, status)
        started.append(server)
        return servicer

    yield start
    for server in started:
        server.stop(None)


def probe(target: str, *flags: str) -> int:
    """deploy/grpc_health_probe.py's exit status, run as Docker's HEALTHCHECK runs it."""
    args = [sys.executable, str(PROBE), "--addr", target, "--timeout", "2", *flags]
    return subprocess.run(args, capture_output=True, timeout=30).returncode


def test_health_checks_speak_grpc_health(health_server, tmp_path):
    haproxy = tool("haproxy")
    port = shared_free_port(LOOPBACK)
    serving = health_server(LOOPBACK[0], port, SERVING)
    not_serving = health_server(LOOPBACK[1], port, NOT_SERVING)
    up, loading, closed = (f"{host}:{port}" for host in LOOPBACK)  # nobody on the third
    assert [probe(t) for t in (up, loading, closed)] == [0, 1, 1]

    dns = DNS(LOOPBACK)
    balancer = HAProxy.start(haproxy, tmp_path, dns.port, port)
    try:
        balancer.wait_states({up: "UP", loading: "DOWN", closed: "DOWN"})
        not_serving.set(SERVICE, SERVING)
        balancer.wait_states({up: "UP", loading: "UP", closed: "DOWN"})
        serving.set(SERVICE, NOT_SERVING)  # a replica draining
        balancer.wait_states({up: "DOWN", loading: "UP", closed: "DOWN"})
    finally:
        balancer.stop()
        dns.stop()
    assert probe(loading) == 0


def test_haproxy_finds_replicas_through_dns_as_they_scale(health_server, tmp_path):
    """Scaling is a DNS change: a new address takes a free server-template slot, a gone one
    empties its slot, and every other replica keeps its slot (so its share of the hash ring)."""
    haproxy = tool("haproxy")
    port = shared_free_port(LOOPBACK)
    for host in LOOPBACK:
        health_server(host, port, SERVING)
    a, b, c = (f"{host}:{port}" for host in LOOPBACK)

    dns = DNS(LOOPBACK[:2])
    balancer = HAProxy.start(haproxy, tmp_path, dns.port, port)
    try:
        balancer.wait_states({a: "UP", b: "UP"})
        assert dns.names == {"loraserve"}  # the compose service name, by default
        slot = {addr: name for addr, (name, _) in balancer.slots().items()}

        dns.addresses = LOOPBACK  # --scale loraserve=3
        balancer.wait_states({a: "UP", b: "UP", c: "UP"})
        grown = {addr: name for addr, (name, _) in balancer.slots().items()}
        assert {a: grown[a], b: grown[b]} == slot and grown[c] not in slot.values()

        dns.addresses = [LOOPBACK[0], LOOPBACK[2]]  # b is gone (after `hold obsolete`)
        balancer.wait_states({a: "UP", c: "UP"}, timeout=20)
        shrunk = {addr: name for addr, (name, _) in balancer.slots().items()}
        assert shrunk == {a: grown[a], c: grown[c]}
    finally:
        balancer.stop()
        dns.stop()


# ------------------------------------------------------------------------------ TLS probes


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA, and a server certificate (localhost, 127.0.0.1) and a client certificate signed by
    it, made with openssl like tests/test_grpc_server.py's; EC keys, which are quick to make."""

    def openssl(*args) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)

    newkey = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    ca, ca_key = folder / "ca.pem", folder / "ca-key.pem"
    openssl("req", "-x509", *newkey, "-keyout", ca_key, "-out", ca, "-days", "1",
            "-subj", "/CN=loraserve test CA")  # fmt: skip
    files = {"ca": ca}
    for name, extension in (
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        key, csr, cert = (folder / f"{name}{suffix}" for suffix in ("-key.pem", ".csr", ".pem"))
        ext = folder / f"{name}.ext"
        ext.write_text(extension + "\n")
        openssl("req", *newkey, "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
                "-out", cert, "-days", "1", "-extfile", ext)  # fmt: skip
        files[name], files[f"{name}_key"] = cert, key
    return files


def test_probe_checks_a_tls_server_with_tls_options_only(tiny_llama, tmp_path):
    pki = make_pki(tmp_path)
    (tmp_path / "ads").mkdir()
    tls = dict(tls_cert=pki["server"], tls_key=pki["server_key"])
    ca = ("--tls", "--ca", str(pki["ca"]))

    server = ServerThread(serving_config(tiny_llama, tmp_path / "ads", **tls))
    try:
        target = server.target  # 127.0.0.1, which the certificate names
        assert probe(target, *ca) == 0
        assert probe(target) == 1  # plaintext to a TLS port: what broke the probes
        assert probe(target, "--tls") == 1  # the system roots do not know this CA
        assert probe(target, *ca, "--server-name", "localhost") == 0
        assert probe(target, *ca, "--server-name", "elsewhere.example") == 1
        assert probe(target, "--ca", str(pki["ca"])) == 2  # TLS options without --tls
    finally:
        server.stop()

    server = ServerThread(
        serving_config(tiny_llama, tmp_path / "ads", tls_client_ca=pki["ca"], **tls)
    )
    try:
        assert probe(server.target, *ca) == 1  # mTLS: no client certificate, no handshake
        client = ("--cert", str(pki["client"]), "--key", str(pki["client_key"]))
        assert probe(server.target, *ca, *client) == 0
    finally:
        server.stop()


# ------------------------------------------------------------------------------ Kubernetes


def k8s_objects() -> dict[tuple[str, str], dict]:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, "every manifest is in kustomization.yaml, and only those"
    objects = {}
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / resource).read_text()):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)
    ]


def entrypoint(path: Path) -> list[str]:
    """The server flags of a Dockerfile's ENTRYPOINT (after the wrapper and the command)."""
    (args,) = [json.loads(a) for i, a in dockerfile_instructions(path) if i == "ENTRYPOINT"]
    assert args[:2] == ["loraserve-entrypoint", "loraserve-server"]
    return args[2:]


def flag(args: list[str], name: str) -> str:
    """The value of ``--name`` in args given as ``--name=v`` or ``--name v``."""
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


def test_kubernetes_manifests_carry_probes_gpu_and_matching_selectors():
    objects = k8s_objects()
    deployment = objects[("Deployment", "loraserve")]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    # the server's flags: the image's ENTRYPOINT, then the Deployment's args (all real flags);
    # $(VAR) is Kubernetes' expansion of the container's env
    env = {e["name"]: e for e in container["env"]}
    args = entrypoint(DEPLOY / "Dockerfile.cuda") + container["args"]
    limits = container["resources"]["limits"]

    # --threads follows the CPU limit through the Downward API, and there is a limit (without
    # one, limits.cpu would read as the whole node)
    threads = re.fullmatch(r"\$\((\w+)\)", flag(args, "--threads"))
    source = env[threads[1]]["valueFrom"]["resourceFieldRef"]
    assert source["resource"] == "limits.cpu" and source["containerName"] == container["name"]
    assert float(limits["cpu"]) >= 1 and str(source.get("divisor", "1")) == "1"
    config = parse_args([a.replace(threads[0], str(limits["cpu"])) for a in args])
    health_port = int(flag(args, "--health-port"))
    assert ports == {"grpc": config.port, "health": health_port, "metrics": config.metrics_port}
    assert config.device.startswith("cuda")

    assert limits["nvidia.com/gpu"] >= 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] >= 1
    # kubelet grpc probes speak plaintext only: they go to the health port, which stays
    # plaintext when the main port uses TLS
    readiness = container["readinessProbe"]["grpc"]
    assert readiness == {"port": health_port, "service": SERVICE}
    assert container["livenessProbe"]["grpc"]["port"] == health_port
    assert container["startupProbe"]["grpc"]["port"] == health_port
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > config.drain_grace

    # SIGTERM arrives after preStop; the drain must end before the kubelet's SIGKILL
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    pre_stop_s = float(pre_stop[1]) if pre_stop[0] == "sleep" else 0.0
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop_s + config.drain_grace

    # adapters from a shared ReadWriteMany volume, mounted where --adapters points
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claim = volumes[mounts[str(config.adapters_dir)]]["persistentVolumeClaim"]["claimName"]
    assert "ReadWriteMany" in objects[("PersistentVolumeClaim", claim)]["spec"]["accessModes"]
    assert Path(config.model).parent.as_posix() in mounts  # --model=/models/base under /models
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    services = {name: o for (kind, name), o in objects.items() if kind == "Service"}
    assert services["loraserve-headless"]["spec"]["clusterIP"] == "None"
    assert services["loraserve"]["spec"].get("clusterIP") != "None"
    for service in services.values():
        assert selects(service["spec"]["selector"], labels)
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, port

    monitor = objects[("ServiceMonitor", "loraserve")]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    chosen = [
        name
        for name, s in services.items()
        if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert chosen == ["loraserve"], "exactly one Service scraped: no duplicate series"
    (endpoint,) = monitor["spec"]["endpoints"]
    service_ports = {p["name"]: p for p in services["loraserve"]["spec"]["ports"]}
    assert service_ports[endpoint["port"]]["targetPort"] == "metrics"
    assert endpoint["path"] == "/metrics"

    pdb = objects[("PodDisruptionBudget", "loraserve")]
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]


def test_kustomize_renders_the_manifests():
    kubectl = tool("kubectl")  # in this machine image; renders deploy/k8s offline
    result = run(kubectl, "kustomize", str(K8S))
    assert result.returncode == 0, result.stderr
    rendered = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(result.stdout)}
    assert rendered == set(k8s_objects())


# ------------------------------------------------------------------------------ images, compose


@pytest.mark.parametrize("name", ["Dockerfile.cuda", "Dockerfile.cpu"])
def test_dockerfiles_run_non_root_with_a_grpc_healthcheck(name):
    path = DEPLOY / name
    steps = dockerfile_instructions(path)
    ins = {}
    for i, a in steps:
        ins.setdefault(i, []).append(a)
    base = ins["FROM"][-1]
    base = dict(re.findall(r"ARG (\w+)=(\S+)", path.read_text())).get(base.strip("${}"), base)
    if name == "Dockerfile.cuda":
        assert base.startswith("nvidia/cuda:") and "-runtime-" in base
        assert "/whl/cu" in path.read_text()
    else:
        assert base.startswith("python:") and "slim" in base
        assert "/whl/cpu" in path.read_text()
    assert ins["USER"][-1] not in ("root", "0")
    assert json.loads(ins["VOLUME"][0]) == ["/adapters"]
    server_args = entrypoint(path)
    health_port = int(flag(server_args, "--health-port"))
    config = parse_args(server_args + json.loads(ins["CMD"][0]))
    assert health_port != config.port
    assert set(ins["EXPOSE"][0].split()) == {str(config.port), str(health_port), "9400"}

    # HEALTHCHECK runs the probe the image copies in, against the plaintext health port (it
    # keeps working when the main port uses TLS)
    (check,) = ins["HEALTHCHECK"]
    command = json.loads(check.split(" CMD ", 1)[1])
    copied = [[w for w in a.split() if not w.startswith("--")] for i, a in steps if i == "COPY"]
    copies = {words[-1]: words[-2] for words in copied}  # dest -> source
    assert copies[command[1]] == "deploy/grpc_health_probe.py"
    assert flag(command, "--addr") == f"127.0.0.1:{health_port}"
    assert config.host == "0.0.0.0" and str(config.adapters_dir) == "/adapters"

    # the ENTRYPOINT wrapper is deploy/entrypoint.sh, executable; LORASERVE_THREADS is its knob;
    # the image's /adapters holds no demo adapters (the wrapper seeds them for --model demo)
    assert copies["/usr/local/bin/loraserve-entrypoint"] == "deploy/entrypoint.sh"
    assert any(i == "COPY" and "--chmod=0755 deploy/entrypoint.sh" in a for i, a in steps)
    assert any(a.split("=")[0] == "LORASERVE_THREADS" for a in ins["ENV"])
    assert not any("demo" in a for a in ins["RUN"])

    # everything COPY'd exists and passes the Dockerfile's own .dockerignore allowlist
    allowed = [
        line[1:].rstrip("/")
        for line in (DEPLOY / f"{name}.dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for words in copied:
        for source in words[:-1]:
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") in allowed, source


def run_entrypoint(tmp_path: Path, *args: str, **env: str) -> list[str]:
    """deploy/entrypoint.sh with a stand-in server that prints its arguments, one a line."""
    server = tmp_path / "print-args"
    server.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    server.chmod(0o755)
    environ = {k: v for k, v in os.environ.items() if k != "LORASERVE_THREADS"}
    environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environ['PATH']}"  # `python`
    environ.update(env)
    result = subprocess.run(
        ["sh", str(ENTRYPOINT_SH), str(server), *args],
        capture_output=True, text=True, env=environ, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_entrypoint_passes_threads_and_seeds_demo_adapters_only_for_the_demo_model(tmp_path):
    demo, real, mine = (tmp_path / name for name in ("demo", "real", "mine"))
    for folder in (demo, real, mine):
        folder.mkdir()
    (mine / "mine.safetensors").write_bytes(b"")

    # --model demo is the server's default: an empty folder gets the demo adapters
    args = ["--adapters", str(demo), "--port", "50051"]
    assert run_entrypoint(tmp_path, *args) == args
    shipped = sorted(p.name for p in demo_adapters_dir().iterdir())
    assert shipped and sorted(p.name for p in demo.iterdir()) == shipped
    # a real model (the last --model wins, as in the server) would refuse them: not seeded
    run_entrypoint(tmp_path, f"--adapters={real}", "--model", "demo", "--model=/models/base")
    assert list(real.iterdir()) == []
    # a folder with adapters in it is left as it is
    run_entrypoint(tmp_path, "--adapters", str(mine), "--model", "demo")
    assert [p.name for p in mine.iterdir()] == ["mine.safetensors"]

    # LORASERVE_THREADS goes first, so an explicit --threads in the command still wins
    args = ["--model", "/models/base", "--threads", "2"]
    assert run_entrypoint(tmp_path, *args, LORASERVE_THREADS="3") == ["--threads", "3", *args]
    assert run_entrypoint(tmp_path, *args, LORASERVE_THREADS="") == args
    assert parse_args(["--threads", "3", *args]) == parse_args(args)  # last one counts


def test_compose_wires_server_prometheus_grafana_and_the_balancer():
    compose = load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"loraserve", "haproxy", "prometheus", "grafana"}
    assert services["haproxy"]["profiles"] == ["scale-out"]
    server = services["loraserve"]
    # one variable picks the Dockerfile and the tag, so a CUDA build is never tagged :cpu
    (variant,) = set(re.findall(r"\$\{(\w+):-cpu\}", server["build"]["dockerfile"]))
    assert re.findall(r"\$\{(\w+):-cpu\}", server["image"]) == [variant]
    for name in ("cpu", "cuda"):
        chosen = re.sub(r"\$\{\w+:-cpu\}", name, server["build"]["dockerfile"])
        assert chosen == f"deploy/Dockerfile.{name}"
        assert (DEPLOY / server["build"]["context"] / chosen).is_file()
        assert re.sub(r"\$\{\w+:-cpu\}", name, server["image"]) == f"loraserve:{name}"
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert kustomization["images"][0]["newTag"] == "cuda"  # the same tag on Kubernetes
    assert "LORASERVE_THREADS" in server["environment"]  # passed on to the entrypoint

    command = [re.sub(r"\$\{\w+:-(.*)\}", r"\1", a) for a in server["command"]]
    config = parse_args(entrypoint(DEPLOY / "Dockerfile.cpu") + command)
    assert "adapters:/adapters" in server["volumes"] and "adapters" in compose["volumes"]
    assert float(server["stop_grace_period"].rstrip("s")) > config.drain_grace

    for service in services.values():  # bind mounts point at files shipped in deploy/
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), volume
    prometheus = services["prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    scrape = load_yaml(PROMETHEUS / "prometheus.yml")["scrape_configs"]
    jobs = {job["job_name"]: job for job in scrape}
    assert jobs["loraserve"]["dns_sd_configs"][0]["port"] == config.metrics_port

    # HAProxy's replicas are the A records of the service name, one per container of
    # `docker compose --scale loraserve=N`; each of its slots has a host port to publish
    template = r'^\s*server-template \S+ 1-(\d+) "\$\{LORASERVE_DNS_NAME-(\S+)\}":(\d+)'
    ((slots, name, port),) = re.findall(template, HAPROXY_CFG.read_text(), re.M)
    assert name in services and services[name] is server
    assert int(port) == config.port
    for published in server["ports"]:
        first, last = map(int, published.split(":")[0].split("-"))
        assert last - first + 1 == int(slots), published


def test_envoy_ring_hashes_the_adapter_header_with_grpc_health_checks():
    envoy = load_yaml(DEPLOY / "envoy" / "envoy.yaml")
    (listener,) = envoy["static_resources"]["listeners"]
    (hcm,) = listener["filter_chains"][0]["filters"]
    (route,) = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    assert route["route"]["hash_policy"] == [{"header": {"header_name": "x-lora-adapter"}}]
    assert "unavailable" in route["route"]["retry_policy"]["retry_on"]
    (cluster,) = envoy["static_resources"]["clusters"]
    assert cluster["lb_policy"] == "RING_HASH"
    assert route["route"]["cluster"] == cluster["name"]
    options = cluster["typed_extension_protocol_options"]
    assert "http2_protocol_options" in next(iter(options.values()))["explicit_http_config"]
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] == SERVICE
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]["address"]
    assert address.startswith("loraserve-headless.")  # the headless Service in deploy/k8s


# ------------------------------------------------------------------------------ scale-out

ADAPTERS = [f"task{i:02d}" for i in range(12)]


def owners(replicas: list[Replica], before: list[dict], names: list[str]) -> dict[str, list]:
    """{adapter: [(replica index, OK requests since ``before``)]} for replicas with any."""
    now = [r.requests() for r in replicas]
    found: dict[str, list] = {n: [] for n in names}
    for i, (b, a) in enumerate(zip(before, now)):
        for name in names:
            delta = a.get((name, "OK"), 0) - b.get((name, "OK"), 0)
            if delta:
                found[name].append((i, delta))
    return found


def send_each(client: LoraClient, names: list[str], times: int) -> None:
    for name in names:
        for _ in range(times):
            assert client.generate("hi", adapter=name, max_new_tokens=2).adapter == name


def test_replicas_behind_haproxy_keep_adapter_affinity(tiny_llama, tmp_path):
    haproxy = tool("haproxy")
    store = tmp_path / "adapters"
    store.mkdir()
    for seed, name in enumerate(ADAPTERS):
        write_adapter(store / f"{name}.safetensors", random_adapter(tiny_llama, name, seed=seed))
    replicas: list[Replica] = []
    balancer = None
    # as under Compose or Kubernetes: one address per replica, one port, found through DNS
    port = shared_free_port(LOOPBACK)
    dns = DNS(LOOPBACK)
    try:
        for i, host in enumerate(LOOPBACK):
            log = tmp_path / f"replica{i + 1}.log"
            flags = ("--watch-poll-interval", "0.5", "--drain-grace", "5")
            bind = ("--host", host, "--port", str(port))
            replicas.append(Replica.start(tiny_llama, store, log, *flags, *bind))
        for replica in replicas:
            replica.wait_ready()
        balancer = HAProxy.start(haproxy, tmp_path, dns.port, port)
        balancer.wait_states({r.target: "UP" for r in replicas})
        assert probe(replicas[0].target) == 0  # the image's HEALTHCHECK, on a real replica

        with LoraClient(balancer.target, retries=1, timeout=30) as client:
            # 1. every adapter lands on exactly one replica, and not all on the same one
            zero = [{} for _ in replicas]
            send_each(client, ADAPTERS, times=3)
            placed = owners(replicas, zero, ADAPTERS)
            assert all(len(o) == 1 and o[0][1] == 3 for o in placed.values()), placed
            home = {name: o[0][0] for name, o in placed.items()}
            assert len(set(home.values())) >= 2, home

            # 2. a file dropped into the shared folder is served through the balancer
            fresh = "fresh-task"
            write_adapter(store / f"{fresh}.safetensors", random_adapter(tiny_llama, fresh, 99))

            def served():
                try:
                    return client.generate("hi", adapter=fresh, max_new_tokens=2)
                except AdapterNotFoundError:
                    return None  # not seen by that replica's watcher yet

            assert wait_for(served, timeout=15, interval=0.2).adapter == fresh
            (owner,) = owners(replicas, zero, [fresh])[fresh]
            home[fresh] = owner[0]

            # 3. SIGTERM the busiest replica while a client keeps calling every adapter
            names = [*ADAPTERS, fresh]
            victim = max(range(3), key=lambda i: sum(h == i for h in home.values()))
            errors, calls, stop = [], [], threading.Event()

            def keep_calling():
                with LoraClient(balancer.target, retries=1, timeout=30) as c:
                    for n in range(5000):  # bounded; stopped by the event long before
                        if stop.is_set():
                            return
                        name = names[n % len(names)]
                        try:
                            c.generate("hi", adapter=name, max_new_tokens=2)
                        except Exception as err:  # noqa: BLE001 - every failure is a finding
                            errors.append((name, repr(err)))
                        calls.append(name)

            caller = threading.Thread(target=keep_calling, daemon=True)
            caller.start()
            wait_for(lambda: len(calls) >= len(names), timeout=30)
            replicas[victim].terminate()
            assert replicas[victim].proc.wait(timeout=20) == 0  # drained, exit 0
            assert probe(replicas[victim].target) == 1
            states = {r.target: "DOWN" if i == victim else "UP" for i, r in enumerate(replicas)}
            balancer.wait_states(states)
            seen = len(calls)
            wait_for(lambda: len(calls) >= seen + len(names), timeout=30)  # a lap after
            stop.set()
            caller.join(timeout=30)
            assert errors == [], f"{len(errors)} failed calls of {len(calls)}: {errors[:3]}"

            # 4. the victim's adapters moved, each to one survivor; the others stayed home
            survivors = [r for i, r in enumerate(replicas) if i != victim]
            index = [i for i in range(3) if i != victim]
            before = [r.requests() for r in survivors]
            send_each(client, names, times=2)
            moved = owners(survivors, before, names)
            for name in names:
                assert len(moved[name]) == 1 and moved[name][0][1] == 2, (name, moved[name])
                now = index[moved[name][0][0]]
                if home[name] != victim:
                    assert now == home[name], f"{name} left a healthy replica"
    finally:
        if balancer is not None:
            balancer.stop()
        dns.stop()
        for replica in replicas:
            replica.stop()
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in tmp_path.glob("*.log"))
        print(logs)  # shown by pytest only when the test fails


# ------------------------------------------------------------------------------ Gateway API
# Inference Extension: deploy/k8s/gateway, read as data; rendered when kubectl is installed

GATEWAY = K8S / "gateway"
# What the endpoint picker may read from a server's /metrics: loraserve's names, and with
# --vllm-metrics the same series under vLLM's names.
EPP_METRICS = {
    "loraserve_waiting_requests",
    "loraserve_running_requests",
    "loraserve_kv_cache_usage_ratio",
    "loraserve_lora_requests_info",
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",
    "vllm:lora_requests_info",
}
# Plugin types the EPP v1.5.0 registers (cmd/epp/runner/runner.go, registerInTreePlugins), the
# scheduling, data-layer, parser and saturation ones.
EPP_PLUGIN_TYPES = {
    "lora-affinity-scorer",
    "queue-scorer",
    "kv-cache-utilization-scorer",
    "running-requests-size-scorer",
    "prefix-cache-scorer",
    "token-load-scorer",
    "max-score-picker",
    "random-picker",
    "weighted-random-picker",
    "single-profile-handler",
    "metrics-data-source",
    "core-metrics-extractor",
    "openai-parser",
    "utilization-detector",
    "concurrency-detector",
}
# The EndpointPickerConfig's fields: the picker decodes it strictly, so any other key (e.g.
# `data:` for `dataLayer:`) stops it at start-up.
EPP_CONFIG_KEYS = {
    "apiVersion",
    "kind",
    "plugins",
    "schedulingProfiles",
    "saturationDetector",
    "dataLayer",
    "flowControl",
    "parser",
    "featureGates",
}
# Metric-name flags the EPP refuses at start-up since v1.4 (pkg/epp/server/options.go,
# Validate): the names go in the core-metrics-extractor's engineConfigs instead.
EPP_REFUSED_FLAGS = {
    "--total-queued-requests-metric",
    "--total-running-requests-metric",
    "--kv-cache-usage-percentage-metric",
    "--lora-info-metric",
    "--cache-info-metric",
}
# Server flags being added to the CLI alongside this component. Until parse_args knows them,
# parse_gateway_server_args checks them against this list and parses the rest with the real CLI;
# once it does, they parse like every other flag and this list no longer matters.
PENDING_SERVER_FLAGS = {"--http-port", "--vllm-metrics"}


def gateway_component() -> dict:
    component = load_yaml(GATEWAY / "kustomization.yaml")
    assert component["kind"] == "Component"
    return component


def gateway_objects() -> dict[tuple[str, str], dict]:
    """The component's objects, its generated ConfigMaps included (under their unhashed name)."""
    component = gateway_component()
    listed = set(component["resources"])
    generated = {f for g in component["configMapGenerator"] for f in g["files"]}
    on_disk = {p.name for p in GATEWAY.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed | generated == on_disk and not listed & generated, "every file used, once"
    objects = {}
    for resource in component["resources"]:
        for doc in yaml.safe_load_all((GATEWAY / resource).read_text()):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    for g in component["configMapGenerator"]:
        data = {Path(f).name: (GATEWAY / f).read_text() for f in g["files"]}
        objects[("ConfigMap", g["name"])] = {"metadata": {"name": g["name"]}, "data": data}
    return objects


def apply_json_patch(doc: dict, ops: list[dict]) -> dict:
    """``doc`` with RFC 6902 ``add`` operations applied (the only kind the component uses)."""
    doc = json.loads(json.dumps(doc))
    for op in ops:
        assert op["op"] == "add", op
        *parents, last = op["path"].lstrip("/").split("/")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), op["value"])
        else:
            node[last] = op["value"]
    return doc


def gateway_server_deployment() -> dict:
    """deploy/k8s's server Deployment with the component's patches applied."""
    deployment = k8s_objects()[("Deployment", "loraserve")]
    for patch in gateway_component()["patches"]:
        target = patch["target"]
        assert (target["kind"], target["name"]) == ("Deployment", "loraserve"), target
        deployment = apply_json_patch(deployment, yaml.safe_load(patch["patch"]))
    return deployment


def server_args(deployment: dict) -> list[str]:
    """The server's flags: the CUDA image's ENTRYPOINT, then the Deployment's args, with
    --threads=$(CPU_LIMIT) expanded as the kubelet would."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    cpu = str(container["resources"]["limits"]["cpu"])
    return [a.replace("$(CPU_LIMIT)", cpu) for a in entrypoint(DEPLOY / "Dockerfile.cuda")] + [
        a.replace("$(CPU_LIMIT)", cpu) for a in container["args"]
    ]


def parse_gateway_server_args(args: list[str]):
    """parse_args(args), tolerating PENDING_SERVER_FLAGS (as ``--flag`` or ``--flag=value``)
    while the CLI does not know them yet."""
    try:
        return parse_args(args)
    except SystemExit:
        # --http-port / --vllm-metrics are being added to the CLI concurrently: check them
        # against the pending list and everything else with the real CLI
        pending = [a for a in args if a.split("=", 1)[0] in PENDING_SERVER_FLAGS]
        if not pending:
            raise
        return parse_args([a for a in args if a not in pending])


def epp_config(objects: dict) -> dict:
    """The EndpointPickerConfig the picker's --config-file names, through its volume."""
    pod = objects[("Deployment", "loraserve-epp")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    path = Path(flag(container["args"], "--config-file"))
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    config_map = objects[("ConfigMap", volume["configMap"]["name"])]
    return yaml.safe_load(config_map["data"][path.name])


def test_gateway_inference_pool_selects_the_servers_on_their_http_port():
    objects = gateway_objects()
    deployment = gateway_server_deployment()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    # every flag the component gives the server parses with the real CLI
    args = server_args(deployment)
    config = parse_gateway_server_args(args)
    http_port = int(flag(args, "--http-port"))
    if getattr(config, "http_port", None) is not None:  # parse_args knows --http-port
        assert config.http_port == http_port
    assert http_port == 8000
    health_port = int(flag(args, "--health-port"))
    assert ports == {
        "grpc": config.port,
        "health": health_port,
        "metrics": config.metrics_port,
        "http": http_port,
    }
    # only the component turns the HTTP API on: deploy/k8s stays as it was
    base_args = server_args(k8s_objects()[("Deployment", "loraserve")])
    assert not any(a.startswith("--http-port") for a in base_args)

    pool = objects[("InferencePool", "loraserve")]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    selector = pool["spec"]["selector"]["matchLabels"]
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    assert selects(selector, labels)
    assert pool["spec"]["targetPorts"] == [{"number": http_port}]
    assert pool["spec"].get("appProtocol", "http") == "http"  # the OpenAI API, HTTP/1.1
    # kustomize keeps the two selectors equal: it copies the Deployment's into the pool
    (replacement,) = gateway_component()["replacements"]
    assert replacement["source"] == {
        "kind": "Deployment",
        "name": "loraserve",
        "fieldPath": "spec.selector.matchLabels",
    }
    (target,) = replacement["targets"]
    assert target["select"] == {"kind": "InferencePool", "name": "loraserve"}
    assert target["fieldPaths"] == ["spec.selector.matchLabels"]

    # the endpoint picker: a Service (the default kind) whose port reaches its ext_proc port,
    # and whose pods are not themselves members of the pool
    ref = pool["spec"]["endpointPickerRef"]
    assert ref.get("kind", "Service") == "Service" and ref.get("group", "") == ""
    assert ref["failureMode"] in ("FailOpen", "FailClose")
    service = objects[("Service", ref["name"])]
    epp = objects[("Deployment", "loraserve-epp")]
    epp_labels = epp["spec"]["template"]["metadata"]["labels"]
    (epp_container,) = epp["spec"]["template"]["spec"]["containers"]
    epp_ports = {p["name"]: p["containerPort"] for p in epp_container["ports"]}
    assert selects(service["spec"]["selector"], epp_labels)
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    assert epp_ports[port["targetPort"]] == int(flag(epp_container["args"], "--grpc-port"))
    assert not selects(selector, epp_labels)


def test_endpoint_picker_names_the_pool_and_metrics_the_server_exports():
    objects = gateway_objects()
    epp = objects[("Deployment", "loraserve-epp")]
    (container,) = epp["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert container["image"].startswith("registry.k8s.io/gateway-api-inference-extension/epp:v")

    # the pool, in the picker's own namespace (Downward API)
    assert ("InferencePool", flag(args, "--pool-name")) in objects
    namespace = re.fullmatch(r"\$\((\w+)\)", flag(args, "--pool-namespace"))
    env = {e["name"]: e for e in container["env"]}
    assert env[namespace[1]]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"

    # metrics: scraped on the server's metrics port (the pool's target port is the HTTP API);
    # the metric names are in the config, since the flags for them stop the picker
    server = parse_gateway_server_args(server_args(gateway_server_deployment()))
    assert int(flag(args, "--model-server-metrics-port")) == server.metrics_port
    assert {a.split("=", 1)[0] for a in args} & EPP_REFUSED_FLAGS == set()

    # probes on the gRPC health port
    health_port = int(flag(args, "--grpc-health-port"))
    assert container["readinessProbe"]["grpc"]["port"] == health_port
    assert container["livenessProbe"]["grpc"]["port"] == health_port
    assert health_port in {p["containerPort"] for p in container["ports"]}

    config = epp_config(objects)
    assert config["apiVersion"] == "inference.networking.x-k8s.io/v1alpha1"
    assert config["kind"] == "EndpointPickerConfig"
    assert set(config) <= EPP_CONFIG_KEYS, set(config) - EPP_CONFIG_KEYS
    plugins = {p.get("name", p["type"]): p for p in config["plugins"]}
    assert len(plugins) == len(config["plugins"]), "plugin names are unique"
    unknown = {p["type"] for p in plugins.values()} - EPP_PLUGIN_TYPES
    assert unknown == set(), f"plugin types the picker does not know: {unknown}"

    # every reference names a plugin; a profile scores by LoRA affinity and picks
    refs = [r["pluginRef"] for prof in config["schedulingProfiles"] for r in prof["plugins"]]
    for source in config["dataLayer"]["sources"]:
        refs += [source["pluginRef"], *(e["pluginRef"] for e in source["extractors"])]
    assert set(refs) <= set(plugins), set(refs) - set(plugins)
    assert any(
        {"lora-affinity-scorer", "max-score-picker"}
        <= {plugins[r["pluginRef"]]["type"] for r in prof["plugins"]}
        for prof in config["schedulingProfiles"]
    )

    # the data layer scrapes /metrics over HTTP and maps loraserve's series with an engine
    # config that is the default for unlabelled pods
    (source,) = config["dataLayer"]["sources"]
    assert plugins[source["pluginRef"]]["type"] == "metrics-data-source"
    assert plugins[source["pluginRef"]].get("parameters", {}).get("path", "/metrics") == "/metrics"
    (extractor,) = [plugins[e["pluginRef"]] for e in source["extractors"]]
    assert extractor["type"] == "core-metrics-extractor"
    params = extractor["parameters"]
    (engine,) = [e for e in params["engineConfigs"] if e["name"] == params["defaultEngine"]]
    specs = ["queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec"]
    families = {key: engine[key].split("{", 1)[0] for key in specs}
    assert set(families.values()) <= EPP_METRICS, set(families.values()) - EPP_METRICS
    assert families["loraSpec"].endswith("lora_requests_info")
    assert families["kvUsageSpec"] in {"loraserve_kv_cache_usage_ratio", "vllm:kv_cache_usage_perc"}


def test_endpoint_picker_rbac_grants_what_it_watches():
    objects = gateway_objects()
    pod = objects[("Deployment", "loraserve-epp")]["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    assert ("ServiceAccount", account) in objects
    assert not {k for k, _ in objects} & {"ClusterRole", "ClusterRoleBinding"}, "namespaced only"

    granted: set[tuple[str, str, str]] = set()
    for (kind, _), binding in objects.items():
        if kind != "RoleBinding":
            continue
        if {"kind": "ServiceAccount", "name": account} not in binding["subjects"]:
            continue
        assert binding["roleRef"]["kind"] == "Role"
        role = objects[("Role", binding["roleRef"]["name"])]
        for rule in role["rules"]:
            assert set(rule["verbs"]) <= {"get", "list", "watch"}, "read-only"
            granted |= {
                (group, resource, verb)
                for group in rule["apiGroups"]
                for resource in rule["resources"]
                for verb in rule["verbs"]
            }
    # the pool and its pods; the optional objects it watches whenever their CRDs are installed
    for group, resource in [
        ("", "pods"),
        ("inference.networking.k8s.io", "inferencepools"),
        ("inference.networking.x-k8s.io", "inferenceobjectives"),
        ("inference.networking.x-k8s.io", "inferencemodelrewrites"),
    ]:
        for verb in ("get", "list", "watch"):
            assert (group, resource, verb) in granted, (group, resource, verb)


def test_httproute_sends_openai_requests_to_the_inference_pool():
    objects = gateway_objects()
    route = objects[("HTTPRoute", "loraserve")]
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    (parent,) = route["spec"]["parentRefs"]
    assert parent.get("group", "gateway.networking.k8s.io") == "gateway.networking.k8s.io"
    assert parent.get("kind", "Gateway") == "Gateway"
    gateway = objects[("Gateway", parent["name"])]
    assert any(listener["protocol"] == "HTTP" for listener in gateway["spec"]["listeners"])

    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [
        {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "loraserve"}
    ]
    assert ("InferencePool", "loraserve") in objects
    (match,) = rule["matches"]
    assert match["path"]["type"] == "PathPrefix"
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert path.startswith(match["path"]["value"])
    assert rule["timeouts"]["request"]  # generations outlast proxies' default route timeouts


def test_kustomize_renders_the_gateway_component(tmp_path):
    kubectl = tool("kubectl")
    # alone, the component refuses to build: no server Deployment to patch and select
    assert run(kubectl, "kustomize", str(GATEWAY)).returncode != 0

    # an overlay outside deploy/k8s, as deploy/README.md shows
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S, overlay)],
        "components": [os.path.relpath(GATEWAY, overlay)],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    result = run(kubectl, "kustomize", str(overlay))
    assert result.returncode == 0, result.stderr
    rendered = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(result.stdout)}

    # everything from both, the generated ConfigMap under a content-hashed name
    (config_map,) = [k for k in rendered if k[0] == "ConfigMap"]
    assert config_map[1].startswith("loraserve-epp-config-")
    expected = set(k8s_objects()) | set(gateway_objects())
    assert set(rendered) - {config_map} == expected - {("ConfigMap", "loraserve-epp-config")}

    # kustomize's patch is the one the data tests above apply; the pool selects the servers
    server = rendered[("Deployment", "loraserve")]
    (container,) = server["spec"]["template"]["spec"]["containers"]
    (patched,) = gateway_server_deployment()["spec"]["template"]["spec"]["containers"]
    assert container["args"] == patched["args"] and "--http-port=8000" in container["args"]
    assert container["ports"] == patched["ports"]
    pool = rendered[("InferencePool", "loraserve")]
    assert pool["spec"]["selector"]["matchLabels"] == server["spec"]["selector"]["matchLabels"]

    # the picker mounts the renamed ConfigMap, whose file is the config the tests read
    epp_pod = rendered[("Deployment", "loraserve-epp")]["spec"]["template"]["spec"]
    names = {v["configMap"]["name"] for v in epp_pod["volumes"] if "configMap" in v}
    assert names == {config_map[1]}
    assert epp_config(rendered) == epp_config(gateway_objects())


def test_endpoint_picker_metrics_are_on_a_real_servers_metrics_page(tiny_llama, tmp_path):
    # EPP_METRICS, the names the picker config may use, against a running server's /metrics
    # (the vllm: names go out with --vllm-metrics)
    (tmp_path / "ads").mkdir()
    config = serving_config(tiny_llama, tmp_path / "ads", metrics_port=0, vllm_metrics=True)
    server = ServerThread(config)
    try:
        url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
        page = urllib.request.urlopen(url, timeout=5).read().decode()
    finally:
        server.stop()
    missing = EPP_METRICS - exported_series(page)
    assert missing == set(), f"the picker config may name series the server lacks: {missing}"
    # the LoRA series carries the labels the picker reads, and max_lora is the slot count
    (labels,) = re.findall(r"^loraserve_lora_requests_info\{(.*)\} \S+$", page, re.M)
    assert f'max_lora="{config.max_active_adapters}"' in labels
    assert "running_lora_adapters=" in labels and "waiting_lora_adapters=" in labels
