"""Per-adapter access control: which bearer token may use which adapters.

``--auth-file FILE`` names the policy, YAML (``.yaml`` / ``.yml``) or TOML (``.toml``), chosen
by the extension::

    tenants:
      - name: acme                # [A-Za-z0-9][A-Za-z0-9._-]{0,63}, unique
        tokens:                   # one or more: "sha256:" + hex SHA-256 of the token's UTF-8
          - sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
        adapters: ["acme-*", "shared-summarize"]   # fnmatch globs, case-sensitive; default []
        base: true                # may use the base model (adapter name ""); default false

or, in TOML, one ``[[tenants]]`` table per tenant with the same keys. The file holds hashes,
never tokens: a leaked policy file grants nothing. ``loraserve hash-token`` computes the line
(``loraserve.client.auth.hash_token_from_stdin``).

The file is checked strictly, because a typo must neither grant nor deny silently: unknown keys
(anywhere), duplicate keys (YAML), wrong types (``base: "false"`` is an error, not a truthy
string), a malformed hash, a hash shared by two tenants and a duplicate tenant name are all
errors. Caps bound the work a hostile or corrupt file can cause: 1 MiB (checked from the size
before reading), 1000 tenants, 100 tokens and 1000 globs per tenant, 256 characters per glob
drawn from ``[A-Za-z0-9._*?[]!-]``. YAML is read by PyYAML's safe loader only (no ``!!python``
tags). Every error is an ``AuthFileError`` naming the file and the place (``tenants[2]
(acme).tokens[0]``); no message or log line ever holds a token or a token hash.

At start-up an invalid file stops the server (``AuthState`` raises: there is no working policy
to fall back on). Later, ``AuthFileWatcher`` polls the file's stat signature and re-reads it
when it changes: a valid file replaces the policy, an invalid one is logged and the working
policy stays. The signature follows symbolic links, so a Kubernetes Secret or ConfigMap mount
(whose ``..data`` link is swapped atomically) is seen; a writer should likewise replace the
file by renaming a complete temporary file over it, since an in-place rewrite of the same size
within one timestamp tick is indistinguishable by stat.
"""

from __future__ import annotations

import fnmatch
import hmac
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from loraserve.client.auth import hash_token

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10: TOML needs the tomli backport
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 1 << 20
MAX_TENANTS = 1000
MAX_TOKENS_PER_TENANT = 100
MAX_GLOBS_PER_TENANT = 1000
MAX_GLOB_CHARS = 256

YAML_SUFFIXES = (".yaml", ".yml")
TOML_SUFFIXES = (".toml",)

TENANT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# the same as loraserve.adapters.format.NAME_RE, copied so that this module does not import
# torch (tests/test_auth_policy.py checks they agree)
ADAPTER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TOKEN_HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")
GLOB_RE = re.compile(r"[A-Za-z0-9._*?\[\]!-]+")
BEARER_RE = re.compile(r"bearer +([!-~]+)", re.IGNORECASE | re.ASCII)
# keys echoed in error messages: short identifiers only, so that a pasted secret never is
_PRINTABLE_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,31}")

TOP_KEYS = frozenset({"tenants"})
TENANT_KEYS = frozenset({"name", "tokens", "adapters", "base"})

BASE = ""  # the adapter name that addresses the base model


class AuthFileError(ValueError):
    """The auth file cannot be used; the message names the file and the place."""


def authorization_header_token(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value, else None.

    The scheme is case-insensitive and followed by one space or more (RFC 6750); surrounding
    spaces or tabs (HTTP's optional whitespace) are ignored. Any other scheme, a missing or
    empty token, or a token with inner whitespace or non-ASCII characters gives None.
    """
    if not value:
        return None
    match = BEARER_RE.fullmatch(value.strip(" \t"))
    return match.group(1) if match else None


@dataclass(frozen=True)
class Tenant:
    """One party with its tokens (as hashes) and the adapters it may use.

    ``token_hashes`` is left out of ``repr`` so that logging a tenant never logs a hash.
    """

    name: str
    token_hashes: frozenset[str] = field(repr=False)
    globs: tuple[str, ...] = ()
    base: bool = False
    # all globs as one compiled regex: fnmatchcase's own translation, compiled once per tenant
    # rather than looked up in fnmatch's (bounded) cache for every glob of every tenant
    _matcher: re.Pattern[str] | None = field(
        init=False, repr=False, compare=False, hash=False, default=None
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_hashes", frozenset(self.token_hashes))
        object.__setattr__(self, "globs", tuple(self.globs))
        if self.globs:
            pattern = "|".join(fnmatch.translate(g) for g in self.globs)
            object.__setattr__(self, "_matcher", re.compile(pattern))

    def may_use(self, adapter: str) -> bool:
        """Whether this tenant may run requests on ``adapter`` ("" is the base model).

        A name that no adapter can have is refused whatever the globs say: ``*`` also
        matches ``/`` and ``..``, which must never reach anything that builds a path.
        """
        if adapter == BASE:
            return self.base
        if self._matcher is None or not ADAPTER_NAME_RE.fullmatch(adapter):
            return False
        return self._matcher.match(adapter) is not None

    def visible(self, names: Iterable[str]) -> list[str]:
        """The names of ``names`` this tenant may use, in their order (for adapter listings)."""
        return [n for n in names if self.may_use(n)]


class AuthPolicy:
    """The tenants of one auth file, immutable: a reload builds a new policy and swaps it."""

    def __init__(self, tenants: Iterable[Tenant]):
        self.tenants: tuple[Tenant, ...] = tuple(tenants)
        entries: list[tuple[bytes, Tenant]] = []
        names: set[str] = set()
        owners: dict[str, str] = {}
        for tenant in self.tenants:
            if tenant.name in names:
                raise ValueError(f"tenant name {tenant.name!r} is used twice")
            names.add(tenant.name)
            for h in sorted(tenant.token_hashes):
                if h in owners:
                    raise ValueError(
                        f"tenants {owners[h]!r} and {tenant.name!r} share a token hash"
                    )
                owners[h] = tenant.name
                entries.append((h.encode("ascii"), tenant))
        self._entries = tuple(entries)

    def __repr__(self) -> str:
        return f"AuthPolicy({len(self.tenants)} tenants)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AuthPolicy) and self.tenants == other.tenants

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> AuthPolicy:
        """Read and check an auth file; every problem is an ``AuthFileError``."""
        return cls(_parse_tenants(path, _load_document(path)))

    def tenant(self, name: str) -> Tenant | None:
        return next((t for t in self.tenants if t.name == name), None)

    def authenticate(self, token: str | None) -> Tenant | None:
        """The tenant ``token`` belongs to, or None.

        The token is hashed once and compared, with ``hmac.compare_digest``, against every
        stored hash with no early exit, so the time taken does not tell whether or which
        tenant matched. (An absent or empty token is refused at once: the caller knew that.)
        """
        if not token:
            return None
        try:
            presented = hash_token(token).encode("ascii")
        except UnicodeEncodeError:  # lone surrogates: no stored token can be that string
            return None
        found: Tenant | None = None
        for stored, tenant in self._entries:
            if hmac.compare_digest(presented, stored):
                found = tenant
        return found


# -- reading the file -----------------------------------------------------------------------------


def _load_document(path: str | os.PathLike[str]) -> Any:
    """The parsed document of the file: checked extension, size and encoding."""
    suffix = Path(path).suffix.lower()
    if suffix not in YAML_SUFFIXES + TOML_SUFFIXES:
        allowed = ", ".join(YAML_SUFFIXES + TOML_SUFFIXES)
        raise AuthFileError(f"{path}: unknown extension {suffix or '(none)'!r}; use {allowed}")
    text = _read_text(path)
    if suffix in TOML_SUFFIXES:
        return _parse_toml(path, text)
    return _parse_yaml(path, text)


def _read_text(path: str | os.PathLike[str]) -> str:
    try:
        # stat first: a FIFO or a device would block or never end, and an oversized file is
        # refused from its size, before a byte of it is read
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise AuthFileError(f"{path}: not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise AuthFileError(
                f"{path}: {st.st_size} bytes, more than the {MAX_FILE_BYTES} allowed"
            )
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)  # it may have grown since the stat
    except OSError as err:
        raise AuthFileError(f"{path}: cannot read: {err.strerror or err}") from None
    if len(data) > MAX_FILE_BYTES:
        raise AuthFileError(f"{path}: more than the {MAX_FILE_BYTES} bytes allowed")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise AuthFileError(f"{path}: not UTF-8 text (byte {err.start})") from None


def _parse_toml(path: str | os.PathLike[str], text: str) -> Any:
    if tomllib is None:  # pragma: no cover - Python 3.10 without tomli
        raise AuthFileError(f"{path}: TOML needs Python 3.11 or the tomli package; use YAML")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:  # its message holds a position, not the text
        raise AuthFileError(f"{path}: invalid TOML: {err}") from None
    except RecursionError:
        raise AuthFileError(f"{path}: invalid TOML: nested too deeply") from None


class _SafeLoaderNoDuplicates(yaml.SafeLoader):
    """PyYAML's safe loader (no python tags), refusing a key given twice in one mapping, which
    plain YAML loading resolves silently in favour of the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<": merged by the base class
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_describe_key(key)}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


_SafeLoaderNoDuplicates.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _SafeLoaderNoDuplicates.construct_mapping
)


def _parse_yaml(path: str | os.PathLike[str], text: str) -> Any:
    try:
        # a subclass of yaml.SafeLoader, so this is yaml.safe_load plus the duplicate-key check
        return yaml.load(text, Loader=_SafeLoaderNoDuplicates)
    except yaml.MarkedYAMLError as err:
        # built by hand: str(err) quotes the offending line, which may hold a token hash
        mark = err.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise AuthFileError(f"{path}: invalid YAML: {err.problem}{where}") from None
    except yaml.YAMLError as err:
        raise AuthFileError(f"{path}: invalid YAML: {type(err).__name__}") from None
    except RecursionError:
        raise AuthFileError(f"{path}: invalid YAML: nested too deeply") from None


def _parse_tenants(path: str | os.PathLike[str], doc: Any) -> list[Tenant]:
    if not isinstance(doc, Mapping):
        raise AuthFileError(f"{path}: expected a mapping with a 'tenants' list at the top")
    _check_keys(path, "top level", doc, TOP_KEYS)
    if "tenants" not in doc:
        raise AuthFileError(f"{path}: top level: missing 'tenants'")
    entries = doc["tenants"]
    if not isinstance(entries, list):
        raise AuthFileError(f"{path}: tenants: expected a list")
    if len(entries) > MAX_TENANTS:
        raise AuthFileError(f"{path}: tenants: {len(entries)} tenants, at most {MAX_TENANTS}")
    tenants: list[Tenant] = []
    names: dict[str, int] = {}
    owners: dict[str, str] = {}  # token hash -> the place that listed it first
    for i, entry in enumerate(entries):
        tenant = _parse_tenant(path, i, entry)
        where = f"tenants[{i}] ({tenant.name})"
        if tenant.name in names:
            raise AuthFileError(
                f"{path}: {where}.name: already used by tenants[{names[tenant.name]}]"
            )
        names[tenant.name] = i
        for j, h in enumerate(entry["tokens"]):  # checked by _parse_tenant
            if h in owners:
                raise AuthFileError(
                    f"{path}: {where}.tokens[{j}]: this token hash is already listed at "
                    f"{owners[h]}; a token belongs to one tenant"
                )
            owners[h] = f"{where}.tokens[{j}]"
        tenants.append(tenant)
    if not tenants:
        log.warning("auth file %s lists no tenants: every request will be refused", path)
    return tenants


def _parse_tenant(path: str | os.PathLike[str], i: int, entry: Any) -> Tenant:
    where = f"tenants[{i}]"
    if not isinstance(entry, Mapping):
        raise AuthFileError(f"{path}: {where}: expected a mapping")
    name = entry.get("name")
    if isinstance(name, str) and TENANT_NAME_RE.fullmatch(name):
        where = f"{where} ({name})"
    _check_keys(path, where, entry, TENANT_KEYS)
    if "name" not in entry:
        raise AuthFileError(f"{path}: {where}: missing 'name'")
    if not isinstance(name, str) or not TENANT_NAME_RE.fullmatch(name):
        raise AuthFileError(
            f"{path}: {where}.name: expected 1-64 characters of [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    if "tokens" not in entry:
        raise AuthFileError(f"{path}: {where}: missing 'tokens'")
    base = entry.get("base", False)
    if not isinstance(base, bool):
        raise AuthFileError(f"{path}: {where}.base: expected true or false")
    return Tenant(
        name=name,
        token_hashes=frozenset(_parse_tokens(path, where, entry["tokens"])),
        globs=tuple(_parse_globs(path, where, entry.get("adapters", []))),
        base=base,
    )


def _parse_tokens(path: str | os.PathLike[str], where: str, tokens: Any) -> list[str]:
    if not isinstance(tokens, list) or not tokens:
        raise AuthFileError(f"{path}: {where}.tokens: expected a list of one token hash or more")
    if len(tokens) > MAX_TOKENS_PER_TENANT:
        raise AuthFileError(
            f"{path}: {where}.tokens: {len(tokens)} tokens, at most {MAX_TOKENS_PER_TENANT}"
        )
    seen: dict[str, int] = {}
    for j, h in enumerate(tokens):
        if not isinstance(h, str) or not TOKEN_HASH_RE.fullmatch(h):
            hint = (
                " (lowercase)" if isinstance(h, str) and TOKEN_HASH_RE.fullmatch(h.lower()) else ""
            )
            raise AuthFileError(
                f'{path}: {where}.tokens[{j}]: expected "sha256:" followed by 64 hex digits{hint}'
            )
        if h in seen:
            raise AuthFileError(f"{path}: {where}.tokens[{j}]: same hash as tokens[{seen[h]}]")
        seen[h] = j
    return list(tokens)


def _parse_globs(path: str | os.PathLike[str], where: str, globs: Any) -> list[str]:
    if not isinstance(globs, list):
        raise AuthFileError(f"{path}: {where}.adapters: expected a list of adapter name globs")
    if len(globs) > MAX_GLOBS_PER_TENANT:
        raise AuthFileError(
            f"{path}: {where}.adapters: {len(globs)} globs, at most {MAX_GLOBS_PER_TENANT}"
        )
    for k, glob in enumerate(globs):
        place = f"{path}: {where}.adapters[{k}]"
        if not isinstance(glob, str) or not glob:
            raise AuthFileError(f"{place}: expected a non-empty string")
        if len(glob) > MAX_GLOB_CHARS:
            raise AuthFileError(f"{place}: {len(glob)} characters, at most {MAX_GLOB_CHARS}")
        if not GLOB_RE.fullmatch(glob):
            bad = next(c for c in glob if not GLOB_RE.fullmatch(c))
            raise AuthFileError(
                f"{place}: character {bad!r} not allowed; use [A-Za-z0-9._-] and the glob "
                "characters * ? [ ] !"
            )
    return list(globs)


def _check_keys(path: str | os.PathLike[str], where: str, doc: Mapping, allowed: frozenset) -> None:
    for key in doc:
        if key not in allowed:
            expected = ", ".join(sorted(allowed))
            raise AuthFileError(
                f"{path}: {where}: unknown key {_describe_key(key)} (expected {expected})"
            )


def _describe_key(key: Any) -> str:
    """A key for an error message: quoted when it looks like a name, else only its type, so
    that a secret pasted in the wrong place is not echoed."""
    if isinstance(key, str) and _PRINTABLE_KEY_RE.fullmatch(key):
        return repr(key)
    return f"(a {type(key).__name__} key)"


# -- reloading -------------------------------------------------------------------------------------

Signature = tuple


def file_signature(path: str | os.PathLike[str]) -> Signature | None:
    """(size, mtime, ctime, inode) of the file, following links; None when it cannot be stat'd.

    ctime makes a permissions fix count as a change; the inode, a file renamed over it.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


_UNSET: Any = object()


class AuthFileWatcher:
    """Polls the auth file and hands each valid new version to ``on_change``.

    A changed signature is read again once: valid -> ``on_change(policy)`` and an info line;
    invalid or unreadable -> an error line (and ``on_error(err)``), and nothing else, so the
    caller's working policy stays. The next change of the file tries again.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        on_change: Callable[[AuthPolicy], None],
        poll_interval: float = 1.0,
        on_error: Callable[[Exception], None] | None = None,
    ):
        self.path = path
        self.on_change = on_change
        self.on_error = on_error
        self.poll_interval = poll_interval
        self._signature: Signature | None = _UNSET
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def load(self) -> AuthPolicy:
        """Read the file now (raising ``AuthFileError``) and remember the signature it had.

        The signature is taken before the read: a change while reading is seen by the next poll.
        """
        signature = file_signature(self.path)
        policy = AuthPolicy.from_file(self.path)
        self._signature = signature
        return policy

    def start(self) -> AuthFileWatcher:
        if self._signature is _UNSET:
            self._signature = file_signature(self.path)
        self._stopped.clear()
        self._thread = threading.Thread(target=self._run, name="loraserve-auth-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def check(self, force: bool = False) -> bool:
        """Re-read the file if its signature changed (or ``force``); True when a new policy was
        handed to ``on_change``."""
        signature = file_signature(self.path)
        if signature == self._signature and not force:
            return False
        self._signature = signature
        try:
            policy = AuthPolicy.from_file(self.path)
        except Exception as err:  # AuthFileError, or a bug: the working policy stays either way
            if isinstance(err, AuthFileError):
                log.error("auth file not reloaded, keeping the working policy: %s", err)
            else:
                log.exception("auth file %s not reloaded, keeping the working policy", self.path)
            if self.on_error is not None:
                self.on_error(err)
            return False
        log.info("auth file %s reloaded: %d tenants", self.path, len(policy.tenants))
        self.on_change(policy)
        return True

    def _run(self) -> None:
        while not self._stopped.wait(self.poll_interval):
            try:
                self.check()
            except Exception:  # on_change or on_error failed: keep watching
                log.exception("watching auth file %s failed", self.path)


class AuthState:
    """The server's current policy, loaded at construction and kept up to date by a watcher.

    Construction raises ``AuthFileError`` for an invalid file: at start-up there is no working
    policy to keep, so the server must not start. Readers just read ``.policy``: a reload
    replaces the whole object in one assignment, so a reader sees the old or the new policy,
    never a mixture. ``reloads`` / ``reload_errors`` count the outcomes, for metrics.
    """

    def __init__(self, path: str | os.PathLike[str], poll_interval: float = 1.0):
        self.path = path
        self.reloads = 0
        self.reload_errors = 0
        self._watcher = AuthFileWatcher(
            path, self._swap, poll_interval=poll_interval, on_error=self._failed
        )
        self.policy: AuthPolicy = self._watcher.load()
        log.info("auth file %s loaded: %d tenants", path, len(self.policy.tenants))

    def start(self) -> AuthState:
        self._watcher.start()
        return self

    def stop(self) -> None:
        self._watcher.stop()

    def reload(self) -> bool:
        """Re-read the file now, changed or not (e.g. on SIGHUP); True when it was valid."""
        return self._watcher.check(force=True)

    def authorize(self, header: str | None, adapter: str | None = None) -> Tenant:
        """The tenant of an ``authorization`` value (``Bearer TOKEN``). Raises
        ``Unauthenticated`` for no token or an unknown one, and ``PermissionDenied`` when
        ``adapter`` ("" = the base model; None = no adapter asked for) is not the tenant's to
        use, before anything looks the adapter up: the answer is the same whether it exists."""
        from loraserve.server.errors import PermissionDenied, Unauthenticated

        tenant = self.policy.authenticate(authorization_header_token(header))
        if tenant is None:
            raise Unauthenticated()
        if adapter is not None and not tenant.may_use(adapter):
            raise PermissionDenied(adapter, tenant.name)
        return tenant

    def _swap(self, policy: AuthPolicy) -> None:
        self.policy = policy
        self.reloads += 1

    def _failed(self, err: Exception) -> None:
        self.reload_errors += 1
