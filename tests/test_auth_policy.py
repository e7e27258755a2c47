"""The auth policy module on its own: the file format and its errors, authentication, per-adapter
authorization, the bearer header, the token-hash helper, and reloading from a changing file.

Real files in tmp_path throughout; nothing about the file system is mocked.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import io
import logging
import os
import threading
import time
from pathlib import Path

import pytest
import yaml
from loraserve.server.auth import (
    MAX_FILE_BYTES,
    AuthFileError,
    AuthFileWatcher,
    AuthPolicy,
    AuthState,
    Tenant,
    authorization_header_token,
    hash_token,
)

TOKENS = {"acme": ["tok-acme-1", "tok-acme-2"], "beta": ["tok-beta"], "gamma": ["tok-gamma"]}
HASHES = {name: [hash_token(t) for t in tokens] for name, tokens in TOKENS.items()}
ALL_TOKENS = [t for tokens in TOKENS.values() for t in tokens]
ALL_DIGESTS = [h.removeprefix("sha256:") for hashes in HASHES.values() for h in hashes]

POLICY_YAML = f"""\
tenants:
  - name: acme
    tokens:
      - {HASHES["acme"][0]}
      - {HASHES["acme"][1]}
    adapters: ["acme-*", "shared-summarize"]
    base: true
  - name: beta
    tokens: [{HASHES["beta"][0]}]
    adapters: ["beta-v?", "shared-*"]
"""

POLICY_TOML = f"""\
[[tenants]]
name = "acme"
tokens = ["{HASHES["acme"][0]}", "{HASHES["acme"][1]}"]
adapters = ["acme-*", "shared-summarize"]
base = true

[[tenants]]
name = "beta"
tokens = ["{HASHES["beta"][0]}"]
adapters = ["beta-v?", "shared-*"]
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def replace(path: Path, text: str) -> None:
    """Write ``text`` over ``path`` the way a careful operator does: a temp file renamed over."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def tenants_yaml(tenants: list[dict]) -> str:
    return yaml.safe_dump({"tenants": tenants})


def tenant(name: str, token: str | None = None, **extra) -> dict:
    return {"name": name, "tokens": [hash_token(token or f"tok-{name}")], **extra}


def assert_no_secrets(text: str) -> None:
    for secret in ALL_TOKENS + ALL_DIGESTS:
        assert secret not in text


def load_error(path: Path) -> str:
    with pytest.raises(AuthFileError) as info:
        AuthPolicy.from_file(path)
    message = str(info.value)
    assert str(path) in message
    assert_no_secrets(message)
    return message


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


# -- the file format ------------------------------------------------------------------------------


def test_yaml_and_toml_give_the_same_policy(tmp_path):
    from_yaml = AuthPolicy.from_file(write(tmp_path / "auth.yaml", POLICY_YAML))
    from_yml = AuthPolicy.from_file(write(tmp_path / "auth.yml", POLICY_YAML))
    from_toml = AuthPolicy.from_file(write(tmp_path / "auth.toml", POLICY_TOML))
    assert from_yaml == from_toml == from_yml
    acme = from_yaml.tenant("acme")
    assert acme == Tenant(
        name="acme",
        token_hashes=frozenset(HASHES["acme"]),
        globs=("acme-*", "shared-summarize"),
        base=True,
    )
    beta = from_toml.tenant("beta")
    assert beta is not None and beta.base is False and beta.globs == ("beta-v?", "shared-*")


def test_defaults_and_an_empty_policy(tmp_path):
    policy = AuthPolicy.from_file(write(tmp_path / "a.yaml", tenants_yaml([tenant("solo")])))
    solo = policy.tenant("solo")
    assert solo.globs == () and solo.base is False
    assert not solo.may_use("") and not solo.may_use("anything")
    empty = AuthPolicy.from_file(write(tmp_path / "empty.toml", "tenants = []\n"))
    assert empty.tenants == () and empty.authenticate("tok-solo") is None


def test_hash_token_is_sha256_of_the_utf8_bytes():
    assert hash_token("test") == (
        "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    )
    assert hash_token("clé") == "sha256:" + hashlib.sha256("clé".encode()).hexdigest()
    assert hash_token("tok\n") != hash_token("tok")  # opaque: nothing stripped here


def test_repr_never_shows_hashes(tmp_path):
    policy = AuthPolicy.from_file(write(tmp_path / "auth.yaml", POLICY_YAML))
    assert_no_secrets(repr(policy) + repr(policy.tenants) + str(policy.tenants[0]))


# -- authentication -------------------------------------------------------------------------------


def test_authenticate(tmp_path):
    policy = AuthPolicy.from_file(write(tmp_path / "auth.yaml", POLICY_YAML))
    assert policy.authenticate("tok-acme-1").name == "acme"
    assert policy.authenticate("tok-acme-2").name == "acme"
    assert policy.authenticate("tok-beta").name == "beta"
    assert policy.authenticate("tok-gamma") is None  # not in this file
    assert policy.authenticate("tok-acme-1 ") is None
    assert policy.authenticate(HASHES["acme"][0]) is None  # the hash is not the token
    assert policy.authenticate("") is None
    assert policy.authenticate(None) is None
    assert policy.authenticate("\ud800") is None  # not encodable: no match, no exception


def test_authenticate_compares_against_every_hash(tmp_path, monkeypatch):
    text = tenants_yaml(
        [
            {"name": name, "tokens": hashes, "adapters": ["*"]}
            for name, hashes in HASHES.items()  # 4 hashes over 3 tenants
        ]
    )
    policy = AuthPolicy.from_file(write(tmp_path / "auth.yaml", text))
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for token, expected in [
        ("tok-acme-1", "acme"),  # the first stored hash: no early exit after it
        ("tok-gamma", "gamma"),  # the last one
        ("wrong", None),
    ]:
        calls.clear()
        found = policy.authenticate(token)
        assert (found.name if found else None) == expected
        assert len(calls) == 4
        stored = {b.decode() for _, b in calls}
        assert stored == {h for hashes in HASHES.values() for h in hashes}
        assert {a for a, _ in calls} == {hash_token(token).encode()}  # hashed once


# -- authorization --------------------------------------------------------------------------------


def test_may_use_globs_exact_names_and_base():
    t = Tenant("acme", frozenset(), ("acme-*", "shared-summarize", "v[0-9]", "x?", "[!a]z"), False)
    assert t.may_use("acme-chat") and t.may_use("acme-") and t.may_use("shared-summarize")
    assert t.may_use("v7") and t.may_use("xy") and t.may_use("bz")
    assert not t.may_use("ACME-chat")  # case-sensitive
    assert not t.may_use("shared-summarize2") and not t.may_use("shared")
    assert not t.may_use("va") and not t.may_use("x") and not t.may_use("xyz")
    assert not t.may_use("az")
    assert not t.may_use("")  # the base model, and base is false
    assert not t.may_use("acme-/../x")  # a glob never admits a name no adapter can have
    assert not t.may_use("acme-x\n")
    assert not Tenant("b", frozenset(), (), True).may_use("base")  # only "" is the base model
    assert Tenant("b", frozenset(), (), True).may_use("")
    assert Tenant("b", frozenset(), ("*",), False).may_use("anything")
    assert not Tenant("b", frozenset(), ("*",), False).may_use("")


def test_may_use_agrees_with_fnmatchcase():
    globs = ["a*", "*b", "a?c", "[ab]x", "[!ab]x", "[a-c]?", "*.v1", "[", "x[!", "**z*"]
    names = ["a", "ab", "abc", "axc", "bx", "cx", "b1", "q.v1", "qv1", "x", "zz", "Ab", "a-z_1"]
    for glob in globs:
        t = Tenant("t", frozenset(), (glob,), False)
        for name in names:
            assert t.may_use(name) == fnmatch.fnmatchcase(name, glob), (glob, name)
    both = Tenant("t", frozenset(), tuple(globs), False)
    for name in names:
        assert both.may_use(name) == any(fnmatch.fnmatchcase(name, g) for g in globs), name


def test_visible(tmp_path):
    policy = AuthPolicy.from_file(write(tmp_path / "auth.yaml", POLICY_YAML))
    names = ["beta-v1", "acme-chat", "shared-summarize", "shared-x", "other", ""]
    assert policy.tenant("acme").visible(names) == ["acme-chat", "shared-summarize", ""]
    assert policy.tenant("beta").visible(names) == ["beta-v1", "shared-summarize", "shared-x"]


def test_adapter_name_rule_matches_the_adapter_format():
    from loraserve.adapters.format import NAME_RE
    from loraserve.server.auth import ADAPTER_NAME_RE

    assert ADAPTER_NAME_RE.pattern == NAME_RE.pattern


# -- bad files ------------------------------------------------------------------------------------


def test_bad_extension(tmp_path):
    message = load_error(write(tmp_path / "auth.json", "{}"))
    assert ".yaml" in message and ".yml" in message and ".toml" in message
    assert ".yaml" in load_error(write(tmp_path / "auth", POLICY_YAML))


def test_missing_and_non_regular_files(tmp_path):
    assert "cannot read" in load_error(tmp_path / "absent.yaml")
    (tmp_path / "dir.yaml").mkdir()
    assert "not a regular file" in load_error(tmp_path / "dir.yaml")


@pytest.mark.parametrize(
    "name, text, place",
    [
        ("list.yaml", "- a\n- b\n", "expected a mapping"),
        ("empty.yaml", "", "expected a mapping"),
        ("scalar.yaml", "tenants\n", "expected a mapping"),
        ("no-tenants.toml", "", "missing 'tenants'"),
        ("top.yaml", "tenants: []\nusers: []\n", "top level: unknown key 'users'"),
        ("top.toml", "tenants = []\n[extra]\n", "top level: unknown key 'extra'"),
        ("tenants-map.yaml", "tenants: {acme: {}}\n", "tenants: expected a list"),
        ("entry.yaml", "tenants: [acme]\n", "tenants[0]: expected a mapping"),
    ],
)
def test_bad_structure(tmp_path, name, text, place):
    assert place in load_error(write(tmp_path / name, text))


def test_unknown_key_in_a_tenant(tmp_path):
    text = tenants_yaml([tenant("acme"), tenant("beta", adapter=["x"])])  # "adapter", a typo
    message = load_error(write(tmp_path / "auth.yaml", text))
    assert "tenants[1] (beta): unknown key 'adapter'" in message
    toml = f'[[tenants]]\nname = "acme"\ntokens = ["{HASHES["acme"][0]}"]\nBase = true\n'
    assert "tenants[0] (acme): unknown key 'Base'" in load_error(write(tmp_path / "a.toml", toml))


def test_unknown_key_that_looks_like_a_secret_is_not_echoed(tmp_path):
    text = (
        f"tenants:\n  - name: acme\n    tokens: [{HASHES['acme'][0]}]\n    x{ALL_DIGESTS[1]}: 1\n"
    )
    assert "tenants[0] (acme): unknown key (a str key)" in load_error(
        write(tmp_path / "auth.yaml", text)
    )


def test_duplicate_yaml_key(tmp_path):
    text = f"tenants:\n  - name: acme\n    tokens: [{HASHES['acme'][0]}]\n    base: false\n"
    message = load_error(write(tmp_path / "auth.yaml", text + "    base: true\n"))
    assert "duplicate key 'base'" in message and "line 5" in message


@pytest.mark.parametrize("name", ["", "-acme", "ac me", "acme/x", "a" * 65, 7, None, ["acme"]])
def test_bad_tenant_name(tmp_path, name):
    text = tenants_yaml([tenant("ok"), {"name": name, "tokens": [HASHES["acme"][0]]}])
    assert "tenants[1].name: expected 1-64 characters" in load_error(
        write(tmp_path / "auth.yaml", text)
    )


def test_missing_name_and_tokens(tmp_path):
    text = tenants_yaml([{"tokens": [HASHES["acme"][0]]}])
    assert "tenants[0]: missing 'name'" in load_error(write(tmp_path / "a.yaml", text))
    text = tenants_yaml([{"name": "acme"}])
    assert "tenants[0] (acme): missing 'tokens'" in load_error(write(tmp_path / "b.yaml", text))
    text = tenants_yaml([{"name": "acme", "tokens": []}])
    assert "tenants[0] (acme).tokens: expected a list" in load_error(
        write(tmp_path / "c.yaml", text)
    )


def test_duplicate_tenant_name(tmp_path):
    text = tenants_yaml([tenant("acme"), tenant("beta"), tenant("acme", "other-token")])
    message = load_error(write(tmp_path / "auth.yaml", text))
    assert "tenants[2] (acme).name: already used by tenants[0]" in message


@pytest.mark.parametrize(
    "bad",
    [
        ALL_DIGESTS[0],  # no prefix
        "sha256:" + ALL_DIGESTS[0][:-1],  # 63 digits
        "sha256:" + ALL_DIGESTS[0] + "0",  # 65
        "sha256:" + ALL_DIGESTS[0].upper(),
        "sha1:" + ALL_DIGESTS[0][:40],
        "sha256:" + "g" * 64,
        "tok-acme-1",  # a raw token pasted instead of its hash
        12345,
    ],
)
def test_bad_hash_format(tmp_path, bad):
    text = tenants_yaml([tenant("beta"), {"name": "acme", "tokens": [HASHES["acme"][1], bad]}])
    message = load_error(write(tmp_path / "auth.yaml", text))
    assert 'tenants[1] (acme).tokens[1]: expected "sha256:" followed by 64 hex digits' in message


def test_duplicate_hash(tmp_path):
    text = tenants_yaml(
        [
            {"name": "acme", "tokens": HASHES["acme"]},
            {"name": "beta", "tokens": [HASHES["beta"][0], HASHES["acme"][1]]},
        ]
    )
    message = load_error(write(tmp_path / "auth.yaml", text))
    assert "tenants[1] (beta).tokens[1]: this token hash is already listed at" in message
    assert "tenants[0] (acme).tokens[1]" in message
    twice = tenants_yaml([{"name": "acme", "tokens": [HASHES["acme"][0]] * 2}])
    assert "tenants[0] (acme).tokens[1]: same hash as tokens[0]" in load_error(
        write(tmp_path / "twice.yaml", twice)
    )


def test_caps_on_counts(tmp_path):
    many = tenants_yaml([tenant(f"t{i}") for i in range(1001)])
    assert "tenants: 1001 tenants, at most 1000" in load_error(write(tmp_path / "a.yaml", many))
    tokens = [hash_token(f"tok-{i}") for i in range(101)]
    text = tenants_yaml([{"name": "acme", "tokens": tokens}])
    assert "tenants[0] (acme).tokens: 101 tokens, at most 100" in load_error(
        write(tmp_path / "b.yaml", text)
    )
    text = tenants_yaml([tenant("acme", adapters=[f"a{i}" for i in range(1001)])])
    assert "tenants[0] (acme).adapters: 1001 globs, at most 1000" in load_error(
        write(tmp_path / "c.yaml", text)
    )
    ok = tenants_yaml([tenant(f"t{i}", adapters=["x"] * 1000) for i in range(3)])
    assert len(AuthPolicy.from_file(write(tmp_path / "ok.yaml", ok)).tenants) == 3


@pytest.mark.parametrize(
    "glob, problem",
    [
        ("acme/*", "character '/' not allowed"),
        ("acme *", "character ' ' not allowed"),
        ("acme-{a,b}", "character '{' not allowed"),
        ("acmé", "character 'é' not allowed"),
        ("", "expected a non-empty string"),
        (3, "expected a non-empty string"),
        ("a" * 257, "257 characters, at most 256"),
    ],
)
def test_bad_glob(tmp_path, glob, problem):
    text = tenants_yaml([tenant("acme", adapters=["acme-*", glob])])
    message = load_error(write(tmp_path / "auth.yaml", text))
    assert f"tenants[0] (acme).adapters[1]: {problem}" in message


def test_adapters_and_base_types(tmp_path):
    text = tenants_yaml([tenant("acme", adapters="acme-*")])
    assert "tenants[0] (acme).adapters: expected a list" in load_error(
        write(tmp_path / "a.yaml", text)
    )
    text = tenants_yaml([tenant("acme", base="false")])  # a string would be truthy
    assert "tenants[0] (acme).base: expected true or false" in load_error(
        write(tmp_path / "b.yaml", text)
    )
    toml = f'[[tenants]]\nname = "acme"\ntokens = ["{HASHES["acme"][0]}"]\nbase = 1\n'
    assert "tenants[0] (acme).base: expected true or false" in load_error(
        write(tmp_path / "c.toml", toml)
    )


def test_oversized_file_is_refused_from_its_size(tmp_path):
    path = tmp_path / "auth.yaml"
    with path.open("w") as f:
        f.write(POLICY_YAML)
        f.write("#" * (MAX_FILE_BYTES - len(POLICY_YAML)) + "\n")  # one byte over
    assert path.stat().st_size == MAX_FILE_BYTES + 1
    message = load_error(path)
    assert f"{MAX_FILE_BYTES + 1} bytes, more than the {MAX_FILE_BYTES} allowed" in message
    # exactly at the cap is fine
    path.write_text(POLICY_YAML + "#" * (MAX_FILE_BYTES - len(POLICY_YAML) - 1) + "\n")
    assert len(AuthPolicy.from_file(path).tenants) == 2


def test_invalid_syntax_and_encoding_do_not_echo_the_file(tmp_path):
    bad_yaml = f"tenants:\n  - name: acme\n    tokens: [{HASHES['acme'][0]}\n"
    message = load_error(write(tmp_path / "auth.yaml", bad_yaml))
    assert "invalid YAML" in message and "line" in message
    bad_toml = f'[[tenants]]\nname = "acme"\ntokens = ["{HASHES["acme"][0]}"\n'
    assert "invalid TOML" in load_error(write(tmp_path / "auth.toml", bad_toml))
    (tmp_path / "latin.yaml").write_bytes(b"tenants: []\n# caf\xe9\n")
    assert "not UTF-8" in load_error(tmp_path / "latin.yaml")
    deep = "tenants: " + "[" * 100_000 + "]" * 100_000 + "\n"
    assert "invalid YAML" in load_error(write(tmp_path / "deep.yaml", deep))


def test_yaml_python_tags_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    text = f'tenants: !!python/object/apply:os.system ["touch {marker}"]\n'
    message = load_error(write(tmp_path / "auth.yaml", text))
    assert "invalid YAML" in message and "python/object/apply" in message
    assert not marker.exists()
    text = "tenants: !!python/name:os.system\n"
    assert "invalid YAML" in load_error(write(tmp_path / "name.yaml", text))


# -- the Authorization header and the CLI helper --------------------------------------------------


@pytest.mark.parametrize(
    "value, token",
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER abc.def-_~+/=", "abc.def-_~+/="),
        ("Bearer    abc", "abc"),
        (" Bearer abc\t", "abc"),  # HTTP's optional whitespace around the value
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Bearer  ", None),
        ("Bearerabc", None),
        ("Bearer\tabc", None),
        ("Bearer a b", None),
        ("Bearer abc\n", None),
        ("Basic YWxhZGRpbjpvcGVuc2VzYW1l", None),
        ("Token abc", None),
        ("abc", None),
        ("Bearer clé", None),
    ],
)
def test_authorization_header_token(value, token):
    assert authorization_header_token(value) == token


def test_hash_token_from_stdin():
    from loraserve.client.auth import hash_token_from_stdin

    expected = hash_token("tok-acme-1")
    for text in ["tok-acme-1", "tok-acme-1\n", "tok-acme-1\r\n"]:
        assert hash_token_from_stdin(io.StringIO(text)) == expected
    assert hash_token_from_stdin(io.BytesIO(b"tok-acme-1\n")) == expected
    for bad in ["", "\n", "\r\n", "tok\n\n", "a\nb", "tok ", " tok", "t\tok", "clé", "\x00"]:
        with pytest.raises(ValueError):
            hash_token_from_stdin(io.StringIO(bad))
    with pytest.raises(ValueError):
        hash_token_from_stdin(io.BytesIO(b"caf\xe9"))


# -- reloading ------------------------------------------------------------------------------------


def test_state_reloads_keeps_the_working_policy_and_logs_no_secrets(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="loraserve.server.auth")
    path = write(tmp_path / "auth.yaml", POLICY_YAML)
    state = AuthState(path, poll_interval=0.05).start()
    try:
        first = state.policy
        assert state.policy.authenticate("tok-acme-1").name == "acme"
        time.sleep(0.2)  # several polls of an unchanged file
        assert state.policy is first and state.reloads == 0

        replace(path, tenants_yaml([tenant("gamma", "tok-gamma", base=True)]))
        assert wait_for(lambda: state.reloads == 1)
        assert state.policy.tenant("gamma") is not None
        assert state.policy.authenticate("tok-acme-1") is None
        assert state.policy.authenticate("tok-gamma").may_use("")
        second = state.policy

        # invalid: logged and counted, the working policy stays
        replace(path, POLICY_YAML + "    bogus: 1\n")
        assert wait_for(lambda: state.reload_errors == 1)
        assert state.policy is second and state.reloads == 1

        # an in-place rewrite of another size is seen too, and repairs the file
        path.write_text(POLICY_YAML + "# repaired\n")
        assert wait_for(lambda: state.reloads == 2)
        assert state.policy.authenticate("tok-beta").name == "beta"

        path.unlink()  # gone: an error, the policy stays
        assert wait_for(lambda: state.reload_errors == 2)
        assert state.policy.authenticate("tok-beta").name == "beta"
    finally:
        started = time.monotonic()
        state.stop()
        assert time.monotonic() - started < 1.0
    records = [r for r in caplog.records if r.name == "loraserve.server.auth"]
    assert any(r.levelno == logging.INFO and "1 tenants" in r.getMessage() for r in records)
    errors = [r.getMessage() for r in records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and "unknown key 'bogus'" in errors[0]
    assert "tenants[" in errors[0] and str(path) in errors[0]
    assert_no_secrets(caplog.text)
    assert_no_secrets("\n".join(r.getMessage() for r in caplog.records))


def test_state_refuses_an_invalid_file_at_start(tmp_path):
    path = write(tmp_path / "auth.yaml", POLICY_YAML.replace("base: true", "base: yes please"))
    with pytest.raises(AuthFileError, match=r"tenants\[0\] \(acme\)\.base"):
        AuthState(path)
    with pytest.raises(AuthFileError):
        AuthState(tmp_path / "absent.toml")


def test_reload_on_demand(tmp_path):
    path = write(tmp_path / "auth.toml", POLICY_TOML)
    state = AuthState(path, poll_interval=3600)  # the watcher never polls in this test
    assert state.reload() and state.reloads == 1  # forced, though unchanged
    write(path, "not toml at all = = =\n")
    assert not state.reload() and state.reload_errors == 1
    assert state.policy.authenticate("tok-acme-2").name == "acme"


def test_stop_is_prompt_whatever_the_poll_interval(tmp_path):
    path = write(tmp_path / "auth.yaml", POLICY_YAML)
    for interval in (0.05, 30.0):
        state = AuthState(path, poll_interval=interval).start()
        time.sleep(0.1)
        started = time.monotonic()
        state.stop()
        assert time.monotonic() - started < 1.0
    assert not any(t.name == "loraserve-auth-watch" for t in threading.enumerate())


def test_watcher_survives_a_failing_callback(tmp_path, caplog):
    path = write(tmp_path / "auth.yaml", POLICY_YAML)
    seen: list[AuthPolicy] = []

    def on_change(policy: AuthPolicy) -> None:
        seen.append(policy)
        if len(seen) == 1:
            raise RuntimeError("callback bug")

    watcher = AuthFileWatcher(path, on_change, poll_interval=0.05)
    assert watcher.load() == AuthPolicy.from_file(path)
    watcher.start()
    try:
        replace(path, tenants_yaml([tenant("one")]))
        assert wait_for(lambda: len(seen) == 1)
        replace(path, tenants_yaml([tenant("two"), tenant("three")]))
        assert wait_for(lambda: len(seen) == 2)
        assert [t.name for t in seen[1].tenants] == ["two", "three"]
    finally:
        watcher.stop()
    assert "callback bug" in caplog.text
