"""Bearer tokens on the client side, with no dependency beyond the standard library: the
``authorization`` metadata every call of a client made with ``token=`` carries, and the hash a
server's ``--auth-file`` lists for a token (``loraserve hash-token``; the server imports
``hash_token`` from here, so the two can never disagree)."""

from __future__ import annotations

import hashlib
import re
from typing import IO

MAX_TOKEN_FILE_CHARS = 64 * 1024  # what hash_token_from_stdin reads at most
# what a bearer token may hold to travel in an Authorization header or gRPC metadata
TOKEN_CHARS_RE = re.compile(r"[!-~]+")


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """``authorization: Bearer TOKEN`` for a server started with ``--auth-file`` (none without
    a token). A token that cannot travel in a header (whitespace, control or non-ASCII
    characters) is refused here, with no request made."""
    if token is None:
        return ()
    if not TOKEN_CHARS_RE.fullmatch(token):
        raise ValueError("the token must be printable ASCII with no spaces")
    return (("authorization", f"Bearer {token}"),)


def hash_token(token: str) -> str:
    """The policy file's form of ``token``: ``"sha256:"`` + the hex SHA-256 of its UTF-8."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def hash_token_from_stdin(stream: IO[str] | IO[bytes]) -> str:
    """Read one token from ``stream`` (the CLI's stdin) and return its ``hash_token`` line.

    Exactly one trailing newline (``\\n`` or ``\\r\\n``) is dropped, as ``echo`` and editors add
    one; any other whitespace is kept, and then refused: a token the server could never
    receive in an ``Authorization: Bearer`` header (empty, spaces, control or non-ASCII
    characters, several lines) is a ValueError rather than a hash that silently never matches.
    """
    data = stream.read(MAX_TOKEN_FILE_CHARS + 1)
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("the token is not UTF-8 text") from None
    if len(data) > MAX_TOKEN_FILE_CHARS:
        raise ValueError(f"the token is longer than {MAX_TOKEN_FILE_CHARS} characters")
    if data.endswith("\r\n"):
        data = data[:-2]
    elif data.endswith("\n"):
        data = data[:-1]
    if not data:
        raise ValueError("empty token")
    if not TOKEN_CHARS_RE.fullmatch(data):
        raise ValueError(
            "the token must be one line of printable ASCII without spaces "
            "(it travels in an Authorization: Bearer header)"
        )
    return hash_token(data)
