"""Run a real ``LoraServer`` on loopback port 0 inside the test process, on its own event loop
thread, so tests call it through real gRPC channels and can still look inside it."""

from __future__ import annotations

import asyncio
import threading

import grpc
from loraserve.server.app import LoraServer
from loraserve.server.runtime import ServerConfig
from loraserve.v1 import inference_pb2_grpc


class ServerThread:
    def __init__(self, config: ServerConfig):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.call(self._make(config))
        self.port = self.call(self.server.start())
        self.target = f"127.0.0.1:{self.port}"

    @staticmethod
    async def _make(config: ServerConfig) -> LoraServer:
        return LoraServer(config)  # built on the loop: it owns asyncio primitives

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def runtime(self):
        return self.server.runtime

    def stub(self) -> inference_pb2_grpc.LoraInferenceStub:
        return inference_pb2_grpc.LoraInferenceStub(grpc.insecure_channel(self.target))

    def stop(self, grace: float = 5.0) -> None:
        try:
            self.call(self.server.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
