"""The server process: gRPC (inference, health, reflection) + the metrics endpoint.

Life cycle, as a load balancer sees it through ``grpc.health.v1.Health``:

    start ──► NOT_SERVING (port open, model loading; calls get UNAVAILABLE)
          ──► SERVING (model and adapters loaded)
    drain ──► NOT_SERVING (new calls get UNAVAILABLE; running ones finish within the grace
              period, then whatever is left is cancelled; UNAVAILABLE goes on for
              ``drain_linger`` more, so late calls are retried elsewhere) ──► stopped

``LoraServer`` is what ``main`` and the tests use; binding port 0 picks a free port, and
``start()`` returns the port actually bound. Every port (gRPC, metrics, the optional plaintext
health port for probes beside TLS, the OpenAI-compatible HTTP API) is bound before the model
loads, so a taken port fails at once with one line naming it. "ready" is logged when health
turns SERVING; the HTTP API answers 503 until then and again once draining starts.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from loraserve.adapters.models.names import display_name
from loraserve.server.auth import AuthState
from loraserve.server.metrics import Metrics
from loraserve.server.openai_api import OpenAIApp, tls_options
from loraserve.server.runtime import Runtime, ServerConfig
from loraserve.server.servicer import LoraInferenceServicer, add_to_server
from loraserve.v1 import inference_pb2

log = logging.getLogger(__name__)

SERVICE = inference_pb2.DESCRIPTOR.services_by_name["LoraInference"].full_name
MAX_MESSAGE_BYTES = 4 << 20  # caps a request (a prompt) at 4 MiB


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if not (config.tls_cert or config.tls_key):
        return None
    if not (config.tls_cert and config.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,  # mTLS when a client CA is given
    )


def _bind(server, host: str, port: int, flag: str, creds=None) -> int:
    address = f"{host}:{port}"
    try:
        bound = (
            server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
        )
    except RuntimeError:  # grpc's "Failed to bind" carries no reason worth more than this
        bound = 0
    if not bound:
        raise OSError(f"cannot listen on {flag} {port} ({host}): the port is taken or not allowed")
    return bound


class LoraServer:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.runtime: Runtime | None = None
        # an invalid auth file stops the start-up (AuthFileError): there is no working one
        self.auth = (
            AuthState(config.auth_file, config.auth_poll_interval)
            if config.auth_file is not None
            else None
        )
        self.servicer = LoraInferenceServicer(model_name=config.model, auth=self.auth)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self.http_port: int | None = None
        self.http: OpenAIApp | None = None
        self.draining = False
        self.started = int(time.time())
        self.served_model_name = config.served_model_name or display_name(config.model)
        self.metrics = Metrics(config.max_adapter_labels)
        self._metrics_server = None
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()

    async def start(self, load: bool = True) -> int:
        """Bind and start answering (NOT_SERVING), then load the model (SERVING)."""
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                # a second server on a taken port must fail, not silently share it
                ("grpc.so_reuseport", 0),
            ]
        )
        add_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        creds = server_credentials(self.config)
        self.port = _bind(server, self.config.host, self.config.port, "--port", creds)
        if self.config.health_port is not None:
            self._health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            self.health_port = _bind(
                self._health_server, self.config.host, self.config.health_port, "--health-port"
            )
        if self.config.metrics_port is not None:
            try:
                self._metrics_server, self.metrics_port = self.metrics.serve(
                    self.config.metrics_port, self.config.host
                )
            except OSError as err:
                raise OSError(
                    f"cannot listen on --metrics-port {self.config.metrics_port} "
                    f"({self.config.host}): {err.strerror or err}"
                ) from None
        if self.config.http_port is not None:
            self.http = OpenAIApp(self)
            self.http_port = await self.http.serve(
                self.config.host, self.config.http_port, tls_options(self.config)
            )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        if self._health_server is not None:
            await self._health_server.start()
            log.info("plaintext health checks on %s:%d", self.config.host, self.health_port)
        if self.metrics_port is not None:
            log.info("metrics on http://%s:%d/metrics", self.config.host, self.metrics_port)
        if self.http_port is not None:
            scheme = "https" if creds else "http"
            log.info(
                "OpenAI-compatible API on %s://%s:%d/v1 (model %r = the base model)",
                scheme,
                self.config.host,
                self.http_port,
                self.served_model_name,
            )
        log.info(
            "loraserve listening on %s:%d (%s)",
            self.config.host,
            self.port,
            "TLS" if creds else "plaintext",
        )
        if self.auth is None:
            log.info("auth: off (no --auth-file): every caller may use every adapter")
        else:
            self.auth.start()
            log.info(
                "auth: %d tenants from %s, reloaded when it changes; health and reflection "
                "stay open",
                len(self.auth.policy.tenants),
                self.config.auth_file,
            )
        if load:
            await self.load()
        return self.port

    async def load(self) -> None:
        runtime = await asyncio.to_thread(lambda: Runtime(self.config, self.metrics).start())
        self.runtime = runtime
        self.servicer.runtime = runtime
        log.info(
            "adapters folder: %s (drop NAME.safetensors or a PEFT folder here)",
            runtime.adapters_dir,
        )
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("ready: serving on %s:%d", self.config.host, self.port)

    async def _set_health(self, status) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE, status)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls, finish running ones within ``grace``."""
        grace = self.config.drain_grace if grace is None else grace
        log.info("draining (grace %.0fs)", grace)
        self.draining = True  # the HTTP API answers 503 to new requests
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.runtime is not None:
            await asyncio.to_thread(self.runtime.stop, grace)
        # Keep answering UNAVAILABLE (which clients and balancers retry elsewhere) a moment
        # longer: a call that reaches grpc's own stop() is CANCELLED instead, never retried.
        await asyncio.sleep(min(self.config.drain_linger, grace))
        if self._server is not None:
            await self._server.stop(1.0)  # responses already finished; let them flush
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self.http is not None:
            await self.http.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        if self.auth is not None:
            self.auth.stop()
        self._stopped.set()
        log.info("stopped")

    async def wait(self) -> None:
        await self._stopped.wait()
