"""``loraserve-server`` / ``python -m loraserve.server``: parse flags once into a ``ServerConfig``,
serve
until SIGTERM or SIGINT, drain, exit 0."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from loraserve.server.app import LoraServer
from loraserve.server.config import ServerConfig, add_arguments, from_args


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    p = argparse.ArgumentParser(
        prog="loraserve-server",
        description="Serve many LoRA adapters on one frozen base model over gRPC.",
    )
    add_arguments(p)  # one flag per ServerConfig field
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    logging.basicConfig(
        level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return from_args(a)


async def serve(config: ServerConfig) -> None:
    server = LoraServer(config)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task] = []

    def drain() -> None:
        if not stopping:
            stopping.append(asyncio.ensure_future(server.stop()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, drain)
    await server.start()
    await server.wait()


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        asyncio.run(serve(config))
    except (ValueError, OSError) as err:  # bad flags, a taken port, a plan that does not fit
        logging.getLogger("loraserve").error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
