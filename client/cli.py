"""``loraserve``: the command-line client.

    loraserve [--target HOST:PORT] [--tls --ca FILE --cert FILE --key FILE] [--token TOKEN]
              [--json] [--timeout S] [--retries N] [--wait-ready S] COMMAND ...

    loraserve generate ADAPTER PROMPT [--max-new-tokens N] [--temperature T] [--top-p P]
                                      [--top-k K] [--seed S] [--stop STR ...] [--request-id ID]
                                      [--json-schema SCHEMA|@FILE | --json-object | --regex RE
                                       | --choice STR ...]
    loraserve stream   ADAPTER PROMPT [same options]     print text as it arrives
    loraserve adapters                                    table of deployed adapters
    loraserve chat     ADAPTER TEXT [--system TEXT] [--stream] [same options]
    loraserve info                                        the server's model, device, limits
    loraserve hash-token < token.txt                      the --auth-file line for a token

ADAPTER ``base`` or ``-`` means the base model alone (no adapter); ``NAME:WEIGHT+NAME:WEIGHT``
(``short:0.7+json:0.3``) is a mixture of adapters; PROMPT ``-`` reads the prompt from stdin.
The target defaults to $LORASERVE_TARGET, else localhost:50051. ``--ca``, ``--cert`` and
``--key`` imply ``--tls``. With ``--json`` every command prints one JSON object (``stream``
prints one per chunk, JSON lines). ``--wait-ready S`` first waits up to S seconds for the
server to report SERVING (a server still loading its model answers UNAVAILABLE).
``--token`` (default: $LORASERVE_TOKEN) is the bearer token for a server with ``--auth-file``.

Exit status: 0 on success, 1 when the server reports an error (printed as
``error: CODE: details``), 2 for usage errors; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

from loraserve.client.auth import hash_token_from_stdin
from loraserve.client.client import LoraClient
from loraserve.client.errors import LoraServeError
from loraserve.client.types import AdapterInfo, Constraint

DEFAULT_TARGET = "localhost:50051"
TOKEN_ENV = "LORASERVE_TOKEN"
BASE_MODEL_NAMES = ("base", "-")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "hash-token":  # no server involved
        return run_hash_token(args)
    if args.token is None:  # the environment is read here only, never by the library
        args.token = os.environ.get(TOKEN_ENV) or None
    try:
        client = connect(args)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))  # exits 2
    try:
        with client:
            if args.wait_ready is not None:
                client.wait_ready(args.wait_ready)
            args.run(client, args)
    except LoraServeError as exc:
        print(f"error: {exc.code.name}: {exc.details}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`loraserve stream ... | head`): stop quietly, and point stdout
        # at /dev/null so the flush at interpreter exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraserve", description="Call a loraserve server: generate text with a LoRA adapter."
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("LORASERVE_TARGET", DEFAULT_TARGET),
        help=f"server address HOST:PORT (default: $LORASERVE_TARGET, else {DEFAULT_TARGET})",
    )
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--ca", metavar="FILE", help="root certificates (PEM); implies --tls")
    parser.add_argument("--cert", metavar="FILE", help="client certificate for mutual TLS (PEM)")
    parser.add_argument("--key", metavar="FILE", help="client private key for mutual TLS (PEM)")
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        help=f"bearer token for a server with --auth-file (default: ${TOKEN_ENV}; prefer the "
        "variable: a flag shows in the process list)",
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--timeout", type=float, metavar="S", help="deadline per call, seconds")
    parser.add_argument(
        "--retries", type=int, default=1, metavar="N", help="retries on UNAVAILABLE (default 1)"
    )
    parser.add_argument(
        "--wait-ready",
        type=float,
        metavar="S",
        help="first wait up to S seconds for the server to finish loading (health SERVING)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument(
        "adapter",
        metavar="ADAPTER",
        type=parse_adapter,
        help='adapter name; "base" or "-" = the base model; NAME:WEIGHT+NAME:WEIGHT = a mixture',
    )
    sampling.add_argument("prompt", metavar="PROMPT", help='prompt text; "-" reads stdin')
    sampling.add_argument("--max-new-tokens", type=int, metavar="N")
    sampling.add_argument("--temperature", type=float, metavar="T", help="0 = greedy")
    sampling.add_argument("--top-p", type=float, metavar="P")
    sampling.add_argument("--top-k", type=int, metavar="K")
    sampling.add_argument("--seed", type=int, metavar="S")
    sampling.add_argument(
        "--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)"
    )
    sampling.add_argument("--request-id", default="", metavar="ID")
    formats = sampling.add_mutually_exclusive_group()  # structured output: one constraint
    formats.add_argument(
        "--json-schema",
        metavar="SCHEMA",
        help="the output is JSON valid under SCHEMA (JSON text, or @FILE)",
    )
    formats.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    formats.add_argument("--regex", metavar="RE", help="the whole output matches RE")
    formats.add_argument(
        "--choice", action="append", metavar="STR", help="the output is one of these (repeatable)"
    )

    generate = commands.add_parser("generate", parents=[sampling], help="print a completion")
    generate.set_defaults(run=run_generate)
    stream = commands.add_parser("stream", parents=[sampling], help="stream a completion")
    stream.set_defaults(run=run_stream)
    chat = commands.add_parser(
        "chat",
        parents=[sampling],
        help="answer PROMPT as a user message, with the model's chat template",
    )
    chat.add_argument("--system", metavar="TEXT", help="a system message first")
    chat.add_argument("--stream", action="store_true", help="print the answer as it comes")
    chat.set_defaults(run=run_chat)
    adapters = commands.add_parser("adapters", help="list deployed adapters")
    adapters.set_defaults(run=run_adapters)
    info = commands.add_parser("info", help="show the server's model, device and limits")
    info.set_defaults(run=run_info)
    commands.add_parser(
        "hash-token",
        help="print the --auth-file line for a token read from stdin (sha256:HEX)",
        description="Read one token from stdin (one trailing newline is dropped) and print "
        "the hash an --auth-file lists for it: the file never holds the token itself.",
    )
    return parser


def connect(args: argparse.Namespace) -> LoraClient:
    """A client for the parsed options; raises OSError for an unreadable certificate file and
    ValueError for an inconsistent set of TLS options."""
    if bool(args.cert) != bool(args.key):
        raise ValueError("--cert and --key go together (mutual TLS)")
    return LoraClient(
        args.target,
        tls=bool(args.tls or args.ca or args.cert),
        root_certificates=read_file(args.ca),
        private_key=read_file(args.key),
        certificate_chain=read_file(args.cert),
        timeout=args.timeout,
        retries=args.retries,
        token=args.token,
    )


def run_hash_token(args: argparse.Namespace) -> int:
    try:
        print(hash_token_from_stdin(sys.stdin))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def parse_adapter(text: str) -> str | dict[str, float]:
    """ADAPTER: a name, the base model ("" for ``base`` / ``-``), or a mixture's members and
    weights (``a:0.7+b:0.3``; a member without a weight weighs 1)."""
    if text in BASE_MODEL_NAMES:
        return ""
    if ":" not in text and "+" not in text:
        return text
    members: dict[str, float] = {}
    for part in text.split("+"):
        name, _, weight = part.partition(":")
        try:
            members[name] = float(weight or 1)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"mixture member {part!r}: {weight!r} is not a number (NAME:WEIGHT+NAME:WEIGHT)"
            ) from None
    return members


def read_file(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def generate_kwargs(args: argparse.Namespace) -> dict:
    """The arguments shared by ``generate`` and ``stream``."""
    return {
        "prompt": sys.stdin.read() if args.prompt == "-" else args.prompt,
        "adapter": args.adapter,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": tuple(args.stop),
        "request_id": args.request_id,
        "constraint": constraint(args),
    }


def constraint(args: argparse.Namespace) -> Constraint | None:
    """The structured-output flag given, if any."""
    if args.json_schema is not None:
        text = args.json_schema
        if text.startswith("@"):
            with open(text[1:], encoding="utf-8") as f:
                text = f.read()
        return Constraint(json_schema=text)
    if args.json_object:
        return Constraint(json_object=True)
    if args.regex is not None:
        return Constraint(regex=args.regex)
    if args.choice:
        return Constraint(choices=tuple(args.choice))
    return None


def run_generate(client: LoraClient, args: argparse.Namespace) -> None:
    completion = client.generate(**generate_kwargs(args))
    if args.json:
        print_json(dataclasses.asdict(completion))
    else:
        print(completion.text)


def run_stream(client: LoraClient, args: argparse.Namespace) -> None:
    print_chunks(client.stream(**generate_kwargs(args)), args)


def print_chunks(chunks, args: argparse.Namespace) -> None:
    """Print a stream as it comes (or one JSON object per chunk)."""
    try:
        for chunk in chunks:
            if args.json:
                print_json(dataclasses.asdict(chunk))
            else:
                print(chunk.text, end="", flush=True)
    finally:
        chunks.close()  # Ctrl-C or a closed pipe mid-stream: cancel the RPC
    if not args.json:
        print()


def run_chat(client: LoraClient, args: argparse.Namespace) -> None:
    kwargs = generate_kwargs(args)
    messages = [{"role": "user", "content": kwargs.pop("prompt")}]
    if args.system:
        messages.insert(0, {"role": "system", "content": args.system})
    if not args.stream:
        completion = client.chat(messages, **kwargs)
        print_json(dataclasses.asdict(completion)) if args.json else print(completion.text)
        return
    print_chunks(client.chat_stream(messages, **kwargs), args)


def run_adapters(client: LoraClient, args: argparse.Namespace) -> None:
    adapters = client.list_adapters()
    if args.json:
        print_json({"adapters": [dataclasses.asdict(a) for a in adapters]})
    else:
        print(adapter_table(adapters))


def run_info(client: LoraClient, args: argparse.Namespace) -> None:
    info = dataclasses.asdict(client.server_info())
    if args.json:
        print_json(info)
    else:
        for key, value in info.items():
            print(f"{key}: {value}")  # unpadded, so `grep '^device: '` works


def adapter_table(adapters: list[AdapterInfo]) -> str:
    """Aligned columns; the version (a content hash) is shortened to 12 characters."""
    header = ("NAME", "VERSION", "RANK", "STATE", "SIZE", "ERROR")
    rows = [
        (a.name, a.version[:12], str(a.rank), a.state.value, human_size(a.size_bytes), a.error)
        for a in sorted(adapters, key=lambda a: a.name)
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    title = "  ".join(cell.ljust(w) for cell, w in zip(header, widths)).rstrip()
    return "\n".join([title, *lines] if rows else [title, "(no adapters)"])


def human_size(n: int) -> str:
    size, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"


def print_json(obj: dict) -> None:
    print(json.dumps(obj, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    sys.exit(main())
