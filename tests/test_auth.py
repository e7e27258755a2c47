"""Per-adapter access control through a real server (``--auth-file``): gRPC with the typed
client and raw stubs, the OpenAI API with the official client and raw HTTP, the CLI.

Every outcome: no token / an unknown one is UNAUTHENTICATED (401); a known token asking for an
adapter outside its globs is PERMISSION_DENIED (403) with the same message whether the adapter
exists or not; listings show only what the caller may use; health and reflection stay open; the
file is reloaded while requests run (a revoked token is refused on its next request, a running
stream finishes); the tenant label is counted and capped; no token or hash reaches a log line.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from loraserve.adapters.format import write_adapter
from loraserve.client import LoraClient
from loraserve.client.errors import LoraServeError
from loraserve.server.auth import hash_token
from loraserve.v1 import inference_pb2 as pb

from tests.checkpoints import make_llama
from tests.grpc_server import ServerThread
from tests.serving import random_adapter, serving_config, wait_for

TOKENS = {"acme": "acme-secret-token-1", "globex": "globex-secret-token-2"}


def policy(acme_globs=("acme-*",), acme_base=True, acme_token=TOKENS["acme"]) -> str:
    return (
        "tenants:\n"
        f"  - name: acme\n    tokens: ['{hash_token(acme_token)}']\n"
        f"    adapters: {list(acme_globs)}\n    base: {str(acme_base).lower()}\n"
        f"  - name: globex\n    tokens: ['{hash_token(TOKENS['globex'])}']\n"
        "    adapters: ['globex-*', 'shared']\n"
    )


def write_policy(path: Path, text: str) -> None:
    """Replace the file by a rename, as the module docstring asks of writers."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    model = make_llama(root / "model")
    adapters = root / "adapters"
    adapters.mkdir()
    for i, name in enumerate(["acme-sql", "globex-sql", "shared"]):
        write_adapter(adapters / f"{name}.safetensors", random_adapter(model, name, seed=40 + i))
    auth = root / "auth.yaml"
    write_policy(auth, policy())
    config = serving_config(
        model,
        adapters,
        http_port=0,
        auth_file=auth,
        auth_poll_interval=0.05,
        max_seq_len=128,
        served_model_name="base-model",
        max_adapter_labels=2,
    )
    server = ServerThread(config)
    yield server, auth
    server.stop()


def stub_call(server, method: str, request, token: str | None):
    metadata = [("authorization", f"Bearer {token}")] if token is not None else []
    return getattr(server.stub(), method)(request, metadata=metadata, timeout=30)


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


GENERATE = pb.GenerateRequest(prompt="hello", params=pb.SamplingParams(max_new_tokens=2))


def generate(adapter: str) -> pb.GenerateRequest:
    request = pb.GenerateRequest()
    request.CopyFrom(GENERATE)
    request.adapter = adapter
    return request


def test_grpc_outcomes(served):
    server, _ = served
    for token in (None, "", "not-a-token", TOKENS["acme"] + "x"):
        code, details = code_of(lambda t=token: stub_call(server, "Generate", generate(""), t))
        assert code is grpc.StatusCode.UNAUTHENTICATED and "Bearer" in details
    # a scheme other than Bearer is no token
    code, _ = code_of(
        lambda: server.stub().Generate(
            generate(""), metadata=[("authorization", f"Basic {TOKENS['acme']}")], timeout=30
        )
    )
    assert code is grpc.StatusCode.UNAUTHENTICATED

    acme, globex = TOKENS["acme"], TOKENS["globex"]
    assert stub_call(server, "Generate", generate("acme-sql"), acme).completion_tokens == 2
    assert stub_call(server, "Generate", generate(""), acme).completion_tokens == 2  # base: yes
    assert stub_call(server, "Generate", generate("shared"), globex).completion_tokens == 2
    # another tenant's adapter, one that exists nowhere, one matching no glob: the same answer
    denied = {
        name: code_of(lambda n=name: stub_call(server, "Generate", generate(n), acme))
        for name in ("globex-sql", "globex-nothing", "shared")
    }
    assert {c for c, _ in denied.values()} == {grpc.StatusCode.PERMISSION_DENIED}
    assert denied["globex-sql"][1].replace("globex-sql", "X") == denied["globex-nothing"][
        1
    ].replace("globex-nothing", "X")
    # inside the globs but not deployed: NOT_FOUND (the caller may know its own names)
    code, _ = code_of(lambda: stub_call(server, "Generate", generate("acme-nothing"), acme))
    assert code is grpc.StatusCode.NOT_FOUND
    # globex may not use the base model
    code, details = code_of(lambda: stub_call(server, "Generate", generate(""), globex))
    assert code is grpc.StatusCode.PERMISSION_DENIED and "base model" in details
    # every generation RPC is guarded: streaming, chat and score too
    chat = pb.ChatRequest(adapter="globex-sql", messages=[pb.ChatMessage(role="user", content="x")])
    code, _ = code_of(lambda: list(stub_call(server, "ChatStream", chat, acme)))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    score = pb.ScoreRequest(adapter="globex-sql", prompt="a", continuations=["b"])
    code, _ = code_of(lambda: stub_call(server, "Score", score, acme))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    code, _ = code_of(lambda: list(stub_call(server, "GenerateStream", generate("shared"), None)))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    # bytes that do not parse: the token is still checked first
    raw = grpc.insecure_channel(server.target).unary_unary("/loraserve.v1.LoraInference/Generate")
    for token, want in ((None, "UNAUTHENTICATED"), (acme, "INVALID_ARGUMENT")):
        metadata = [("authorization", f"Bearer {token}")] if token else []
        code, _ = code_of(lambda m=metadata: raw(b"\xff\xff\xff", metadata=m, timeout=30))
        assert code.name == want


def test_listings_show_only_what_the_caller_may_use(served):
    server, _ = served
    listed = {
        who: {
            a.name for a in stub_call(server, "ListAdapters", pb.ListAdaptersRequest(), t).adapters
        }
        for who, t in TOKENS.items()
    }
    assert listed == {"acme": {"acme-sql"}, "globex": {"globex-sql", "shared"}}
    for method, request in (
        ("ListAdapters", pb.ListAdaptersRequest()),
        ("GetServerInfo", pb.GetServerInfoRequest()),
    ):
        code, _ = code_of(lambda m=method, r=request: stub_call(server, m, r, None))
        assert code is grpc.StatusCode.UNAUTHENTICATED
    assert stub_call(
        server, "GetServerInfo", pb.GetServerInfoRequest(), TOKENS["globex"]
    ).max_seq_len


def test_health_and_reflection_stay_open(served):
    server, _ = served
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert "loraserve.v1.LoraInference" in names


def test_typed_client_and_cli_take_a_token(served, monkeypatch):
    server, _ = served
    with LoraClient(server.target, token=TOKENS["acme"]) as c:
        assert c.generate("hi", adapter="acme-sql", max_new_tokens=2).completion_tokens == 2
        assert [a.name for a in c.list_adapters()] == ["acme-sql"]
        with pytest.raises(LoraServeError) as info:
            c.generate("hi", adapter="globex-sql", max_new_tokens=2)
        assert info.value.code is grpc.StatusCode.PERMISSION_DENIED
    with LoraClient(server.target) as c, pytest.raises(LoraServeError) as info:
        c.generate("hi", max_new_tokens=2)
    assert info.value.code is grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(ValueError):
        LoraClient(server.target, token="has space")

    def cli(*args, env=None):
        return subprocess.run(
            [sys.executable, "-m", "loraserve.client.cli", "--target", server.target, *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **(env or {})},
        )

    done = cli(
        "generate",
        "acme-sql",
        "hi",
        "--max-new-tokens",
        "2",
        env={"LORASERVE_TOKEN": TOKENS["acme"]},
    )
    assert done.returncode == 0, done.stderr
    done = cli("--token", TOKENS["globex"], "generate", "acme-sql", "hi")
    assert done.returncode == 1 and "PERMISSION_DENIED" in done.stderr
    env = {k: v for k, v in os.environ.items() if k != "LORASERVE_TOKEN"}
    done = subprocess.run(
        [sys.executable, "-m", "loraserve.client.cli", "--target", server.target, "adapters"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 1 and "UNAUTHENTICATED" in done.stderr
    hashed = subprocess.run(
        [sys.executable, "-m", "loraserve.client.cli", "hash-token"],
        input=TOKENS["acme"] + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert hashed.returncode == 0 and hashed.stdout.strip() == hash_token(TOKENS["acme"])


def test_openai_api_outcomes(served):
    server, _ = served
    base = f"http://127.0.0.1:{server.server.http_port}/v1"

    def api(token: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=base, api_key=token, max_retries=0)

    with pytest.raises(openai.AuthenticationError) as info:
        api("wrong").completions.create(model="acme-sql", prompt="hi", max_tokens=2)
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    reply = api(TOKENS["acme"]).completions.create(model="acme-sql", prompt="hi", max_tokens=2)
    assert reply.usage.completion_tokens == 2
    messages = [{"role": "user", "content": "hi"}]
    for model in ("globex-sql", "globex-nothing"):
        with pytest.raises(openai.PermissionDeniedError) as info:
            api(TOKENS["acme"]).chat.completions.create(model=model, messages=messages)
        assert info.value.status_code == 403 and model in info.value.message
    with pytest.raises(openai.PermissionDeniedError):  # globex: no base model
        api(TOKENS["globex"]).completions.create(model="base-model", prompt="hi", max_tokens=2)
    with pytest.raises(openai.PermissionDeniedError):
        api(TOKENS["acme"]).models.retrieve("globex-sql")
    assert {m.id for m in api(TOKENS["acme"]).models.list()} == {"base-model", "acme-sql"}
    assert {m.id for m in api(TOKENS["globex"]).models.list()} == {"globex-sql", "shared"}
    with pytest.raises(urllib.error.HTTPError) as info:  # no Authorization header at all
        urllib.request.urlopen(base + "/models", timeout=10)
    assert info.value.code == 401
    assert json.loads(info.value.read())["error"]["code"] == "invalid_api_key"
    # a stream is authorized before its 200
    with pytest.raises(openai.PermissionDeniedError):
        api(TOKENS["globex"]).completions.create(
            model="acme-sql", prompt="hi", max_tokens=2, stream=True
        )
    # /health stays open; no body is read before the token is checked: a request that
    # announces a huge body and sends none of it is answered 401 at once. (Sending the body
    # too raced: the server answers and closes with the upload unread, and the client, still
    # writing, could see a broken pipe instead of the 401.)
    with urllib.request.urlopen(base.removesuffix("/v1") + "/health", timeout=10) as r:
        assert r.status == 200
    with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=10) as conn:
        conn.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (1 << 20)
        )
        reply = conn.recv(65536)
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]


def test_every_member_of_a_mixture_obeys_access_control(served):
    """A mixture is refused when any member is not the caller's (the message names it, the
    same whether it exists or not), on gRPC and the OpenAI API alike."""
    server, _ = served

    def mixture(*names: str) -> pb.GenerateRequest:
        request = generate("")
        request.adapters.extend(pb.AdapterWeight(name=n, weight=0.5) for n in names)
        return request

    ok = stub_call(server, "Generate", mixture("globex-sql", "shared"), TOKENS["globex"])
    assert [v.name for v in ok.adapter_versions] == ["globex-sql", "shared"]
    for names in (("acme-sql", "shared"), ("acme-sql", "acme-nothing", "globex-nothing")):
        code, details = code_of(
            lambda n=names: stub_call(server, "Generate", mixture(*n), TOKENS["acme"])
        )
        # permissions come before existence: acme-nothing is acme's to ask for
        assert code is grpc.StatusCode.PERMISSION_DENIED and names[-1] in details
    code, _ = code_of(lambda: stub_call(server, "Generate", mixture("acme-sql", "shared"), None))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    api = openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.server.http_port}/v1",
        api_key=TOKENS["acme"],
        max_retries=0,
    )
    with pytest.raises(openai.PermissionDeniedError) as info:
        api.completions.create(model="acme-sql:0.5+globex-sql:0.5", prompt="hi", max_tokens=2)
    assert "globex-sql" in info.value.message
    reply = api.completions.create(model="acme-sql:0.5", prompt="hi", max_tokens=2)
    assert reply.usage.completion_tokens == 2


def metric(server, name: str, labels: dict) -> float:
    from prometheus_client import generate_latest

    text = generate_latest(server.runtime.metrics.registry).decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_tenant_label_counts_and_caps(served):
    server, _ = served
    before = metric(server, "loraserve_tenant_requests_total", {"tenant": "acme", "code": "OK"})
    stub_call(server, "Generate", generate("acme-sql"), TOKENS["acme"])
    # recorded as the handler ends, which may be just after the caller has its answer
    ok = {"tenant": "acme", "code": "OK"}
    wait_for(lambda: metric(server, "loraserve_tenant_requests_total", ok) >= before + 1)
    denied = {"tenant": "acme", "code": "PERMISSION_DENIED"}
    before = metric(server, "loraserve_tenant_requests_total", denied)
    code_of(lambda: stub_call(server, "Generate", generate("globex-sql"), TOKENS["acme"]))
    wait_for(lambda: metric(server, "loraserve_tenant_requests_total", denied) >= before + 1)
    code_of(lambda: stub_call(server, "Generate", generate(""), "nope"))
    wait_for(lambda: metric(server, "loraserve_tenant_requests_total", {"tenant": "-"}) >= 1)
    # max_adapter_labels=2 caps tenants too: a third distinct tenant name is __other__
    labels = server.runtime.metrics.tenant_label
    assert {labels(n) for n in ("acme", "-", "globex", "initech")} <= {"acme", "-", "__other__"}


def test_the_file_reloads_while_requests_run(served, caplog):
    """Revoking acme's token: its running stream finishes; its next request is refused. An
    invalid file is logged and changes nothing. No token or hash reaches any log line."""
    server, auth = served
    caplog.set_level(logging.DEBUG)
    state = server.server.auth
    started = threading.Event()
    result: dict = {}

    def long_stream():
        request = generate("acme-sql")
        request.params.max_new_tokens = 60
        stream = stub_call(server, "GenerateStream", request, TOKENS["acme"])
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            started.set()
            time.sleep(0.01)
        result["chunks"] = chunks

    try:
        thread = threading.Thread(target=long_stream)
        thread.start()
        assert started.wait(30)
        reloads = state.reloads
        new_acme = "acme-rotated-token"
        write_policy(auth, policy(acme_token=new_acme))
        wait_for(lambda: state.reloads > reloads, timeout=10)
        code, _ = code_of(lambda: stub_call(server, "Generate", generate(""), TOKENS["acme"]))
        assert code is grpc.StatusCode.UNAUTHENTICATED
        assert stub_call(server, "Generate", generate(""), new_acme).completion_tokens == 2
        thread.join(60)
        assert result["chunks"][-1].finish_reason in (pb.STOP, pb.LENGTH)

        errors = state.reload_errors
        write_policy(auth, "tenants: [{name: acme, tokens: [nonsense]}]\n")
        wait_for(lambda: state.reload_errors > errors, timeout=10)
        assert stub_call(server, "Generate", generate(""), new_acme).completion_tokens == 2
        secrets = [*TOKENS.values(), new_acme]
        secrets += [hash_token(t).removeprefix("sha256:") for t in secrets]
        assert not any(s in caplog.text for s in secrets)
        assert "auth.yaml" in caplog.text  # the bad reload was logged
    finally:
        write_policy(auth, policy())
        wait_for(lambda: state.policy.authenticate(TOKENS["acme"]) is not None, timeout=10)


def test_without_an_auth_file_everything_is_open_and_the_log_says_so(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    model = make_llama(tmp_path / "model")
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    server = ServerThread(serving_config(model, adapters, max_seq_len=64))
    try:
        assert stub_call(server, "Generate", generate(""), None).completion_tokens == 2
        assert "auth: off" in caplog.text
    finally:
        server.stop()


def test_an_invalid_auth_file_stops_start_up_with_one_line(tmp_path):
    model = make_llama(tmp_path / "model")
    auth = tmp_path / "auth.toml"
    auth.write_text('[[tenants]]\nname = "x"\ntokens = ["sha256:00"]\n')
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loraserve.server",
            "--model",
            str(model),
            "--adapters",
            str(tmp_path),
            "--port",
            "0",
            "--auth-file",
            str(auth),
            "--compile",
            "off",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "auth.toml" in done.stderr and "tokens[0]" in done.stderr
    assert "Traceback" not in done.stderr
    json.dumps(done.stderr)  # one readable message
