"""Assemble a serving stack from a ``ServerConfig``: everything but the network.

    base model (frozen) ──► batched LoRA slot tables on every adapted linear
                         ──► static KV cache
    adapters folder ──► registry ──► host cache ──► device slots ──► engine thread
                         ▲                                            (decode step: eager, or
                  folder watcher                                       static and compiled)

``Runtime`` owns the parts and their order of start and stop. The gRPC layer
(``loraserve.server.app``) and tests use it the same way: ``Runtime(config).start()`` ...
``stop(grace)``.

Before it allocates the KV cache and slot tables it sets torch's CPU threads and checks the memory
plan (``loraserve.server.resources``): a server that cannot fit says so at start-up, naming the
knobs, instead of being killed later.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
from loraserve.adapters.chat_template import ChatTemplate, ChatTemplateError
from loraserve.adapters.demo_paths import demo_adapters_dir
from loraserve.adapters.format import (
    Adapter,
    WeightsOutOfRange,
    validate_adapter,
)
from loraserve.adapters.kernels import cpu as cpu_kernels
from loraserve.adapters.lora import linear_shapes, replace_linear_with_batched_lora, target_names
from loraserve.adapters.models import KVCache, load_model
from loraserve.adapters.models.attention import decode_attention
from loraserve.adapters.models.decode import DecodeStep
from loraserve.adapters.models.names import model_folder
from loraserve.adapters.models.packed import can_pack, fuse_projections, pack_linears
from loraserve.server.adapter_cache import AdapterCache, HostCache
from loraserve.server.config import ServerConfig
from loraserve.server.engine import Engine
from loraserve.server.grammar import Grammars
from loraserve.server.metrics import Metrics, RouterState
from loraserve.server.registry import AdapterRegistry
from loraserve.server.resources import (
    available_cpus,
    available_memory,
    max_adapter_bytes,
    max_header_bytes,
    plan_memory,
)
from loraserve.server.sampling import torch_row_max
from loraserve.server.watcher import AdapterWatcher

__all__ = ["SERVER_VERSION", "Runtime", "ServerConfig"]

log = logging.getLogger(__name__)

SERVER_VERSION = "0.1.0"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def pick_lora_dtype(name: str, dtype: torch.dtype, backend: str) -> torch.dtype:
    """The slot tables' dtype for ``--lora-dtype``: auto = the weights' ``dtype``."""
    if name == "auto":
        return dtype
    lora_dtype = pick_dtype(name, torch.device("cpu"))
    if backend == "triton" and lora_dtype != dtype:
        raise ValueError(
            f"--lora-dtype {name} needs --lora-backend gather (the triton kernels keep the slot "
            f"tables in the weights' dtype, {str(dtype).removeprefix('torch.')})"
        )
    return lora_dtype


def decode_mode(config: ServerConfig, device: torch.device) -> str | None:
    """The ``DecodeStep`` mode ``--compile`` means on ``device``; None = the eager step."""
    if config.compile == "off":
        return None
    static_backend = config.lora_backend in ("gather", "triton")
    if config.compile != "auto":
        if not static_backend:
            raise ValueError(
                f"--compile {config.compile} needs --lora-backend gather or triton, not "
                f"{config.lora_backend} (it routes on the host, token by token)"
            )
        return config.compile
    if not static_backend:
        return None
    if device.type == "cuda":
        # not yet run on a GPU by this project: opt-in until it has passed its tests there
        return "cuda-graphs" if os.environ.get("LORASERVE_CUDA_GRAPHS") == "1" else None
    if device.type != "cpu":
        return None
    if not cpu_kernels.cxx_compiler():
        log.info("no C++ compiler (g++, c++ or clang++; $CXX): the eager decode step")
        return None
    return "inductor"


def on_exiting_thread(fn):
    """Run ``fn()`` on a new thread that exits when it returns; re-raise what it raised.

    torch's CPU ops run on OpenMP, and GNU libgomp keeps a worker pool for every thread that
    ever ran a parallel op. Once the pools together hold more threads than there are CPUs,
    libgomp stops spin-waiting between parallel regions, and every op the engine thread runs
    pays a futex wake-up (0.1-0.2 ms). Loading the model here, and not on a thread that lives
    on, keeps the engine thread's pool the only one.
    """
    box: list = []

    def run():
        try:
            box.append((fn(), None))
        except BaseException as e:  # re-raised on the caller's thread
            box.append((None, e))

    thread = threading.Thread(target=run, name="loraserve-build")
    thread.start()
    thread.join()
    result, error = box[0]
    if error is not None:
        raise error
    return result


class Runtime:
    def __init__(self, config: ServerConfig, metrics: Metrics | None = None):
        self.device = pick_device(config.device)
        self.dtype = pick_dtype(config.dtype, self.device)
        self.threads = config.threads or available_cpus()
        torch.set_num_threads(self.threads)  # inherited by the threads started from here
        log.info(
            "torch CPU threads: %d (%s)",
            self.threads,
            "--threads" if config.threads else "CPUs available to this process",
        )
        self.metrics = metrics or Metrics(config.max_adapter_labels)
        on_exiting_thread(lambda: self._build(config))

    def _build(self, config: ServerConfig) -> None:
        self.decode_mode = decode_mode(config, self.device)  # a bad pairing fails before loading
        self.lora_dtype = pick_lora_dtype(config.lora_dtype, self.dtype, config.lora_backend)
        self.loaded = load_model(model_folder(config.model), self.device, self.dtype)
        limit = self.loaded.config.max_position_embeddings
        if config.max_seq_len > limit:
            log.info("max_seq_len %d lowered to the model's %d", config.max_seq_len, limit)
            config = replace(config, max_seq_len=limit)
        self.config = config
        if self.loaded.tokenizer is None:
            raise ValueError(f"{self.loaded.path} has no tokenizer.json; the server needs one")
        self.tokenizer = self.loaded.tokenizer
        # the base model's chat template (None: chat needs an adapter that carries one)
        try:
            self.chat_template = ChatTemplate.from_folder(self.loaded.path)
        except ChatTemplateError as err:  # chat is refused; everything else serves
            log.error("the base model's chat template cannot be used: %s", err)
            self.chat_template = None
        model = self.loaded.model
        self.base_shapes = linear_shapes(model)
        targeted = target_names(model, config.lora_targets)
        packed = self.decode_mode == "inductor" and can_pack(self.device, self.dtype)
        self.memory_plan = plan_memory(
            model,
            self.loaded.config,
            {n: self.base_shapes[n] for n in targeted},
            max_batch_size=config.max_batch_size,
            max_seq_len=config.max_seq_len,
            slots=config.max_active_adapters,
            max_rank=config.max_lora_rank,
            host_cache_bytes=config.max_cached_bytes,
            dtype=self.dtype,
            device=self.device,
            packed=packed,
            lora_dtype=self.lora_dtype,
        )
        log.info("%s", self.memory_plan.describe())
        self.memory_plan.check(config.max_memory, available_memory(self.device))
        self.table = replace_linear_with_batched_lora(
            model,
            config.lora_targets,
            config.max_active_adapters,
            config.max_lora_rank,
            backend=config.lora_backend,
            dtype=self.lora_dtype,
        )
        self.lora_shapes = {n: self.base_shapes[n] for n in self.table.layers}
        if packed:  # through the native op when the CPU library builds here
            native = cpu_kernels.available()
            groups = fuse_projections(model)
            n = pack_linears(model, native)
            kernel = f"native op, {cpu_kernels.packed_kernel()}" if native else "Python op, oneDNN"
            log.info(
                "packed %d linear layers for the CPU GEMM (%s), %d groups of projections that "
                "share an input fused",
                *(n, kernel, groups),
            )
        self.kv_cache = KVCache(
            self.loaded.config, config.max_batch_size, config.max_seq_len, self.device, self.dtype
        )
        self.adapters_dir = Path(config.adapters_dir or demo_adapters_dir())
        self.host = HostCache(config.max_cached_adapters, config.max_cached_bytes, self.metrics)
        self.registry = AdapterRegistry(
            self.adapters_dir,
            self.check_adapter,
            self.host.put,
            self.metrics,
            max_bytes=max_adapter_bytes(self.lora_shapes, config.max_lora_rank),
            max_header_bytes=max_header_bytes(self.lora_shapes),
        )
        # only deployed adapters own a metrics label: refused files are as many as anyone can
        # drop into the folder, and share __unknown__ with names that do not exist
        self.metrics.label.known = lambda name: self.registry.current(name) is not None
        self.cache = AdapterCache(
            self.registry,
            self.table,
            self.host,
            self.device,
            self.metrics,
            # read ahead from disk for as many waiting adapters as there are device slots
            prefetch=max(1, min(config.max_active_adapters, config.max_cached_adapters // 2)),
        )
        self.row_max = torch_row_max  # the sampler's; the native op's with the native ops
        self.decoder = self._decoder(model, config)
        # structured output over the model's whole logits width (its tokenizer built on first
        # use); eos: the tokens that end a completed format
        self.grammars = Grammars(
            self.loaded.path / "tokenizer.json",
            self.loaded.config.vocab_size,
            self.tokenizer.eos_token_ids,
        )
        self.engine = Engine(
            model,
            self.kv_cache,
            self.tokenizer,
            config.engine_config(),
            self.cache,
            self.metrics,
            self.device,
            self.decoder,
            self.grammars,
            self.row_max,
        )
        self.cache.wake = self.engine.wake
        self.metrics.bind_state(
            self.engine.stats, self.residency, lambda: len(self.registry.errors())
        )
        self.metrics.bind_router_state(self.router_state, vllm=config.vllm_metrics)
        self.metrics.set_build_info(
            version=SERVER_VERSION,
            model=config.model,
            architecture=self.loaded.config.arch,
            base_fingerprint=self.loaded.fingerprint,
            device=self.device,
            dtype=str(self.dtype).removeprefix("torch."),
            threads=self.threads,
        )
        self.watcher = AdapterWatcher(
            self.registry, config.watch_debounce, config.watch_poll_interval
        )

    def _decoder(self, model: torch.nn.Module, config: ServerConfig) -> DecodeStep | None:
        """The static decode step ``--compile`` asks for, warmed up (compiled, captured) for
        every bucket before the server says SERVING; None for the eager step."""
        if self.decode_mode is None:
            return None
        decoder = DecodeStep(
            model,
            self.kv_cache,
            self.table,
            max_batch=config.max_batch_size,
            max_rank=config.max_lora_rank,
            mode=self.decode_mode,
            device=self.device,
            max_mixture=config.engine_config().max_mixture,
        )
        self._use_native_ops(config)
        log.info(
            "decode step %s: warming up batch buckets %s x rank buckets %s x mixed routing %s",
            self.decode_mode,
            decoder.buckets,
            decoder.ranks,
            decoder.modes,
        )
        try:
            seconds = decoder.warm_up()
        except Exception:  # a compiler that fails here must not keep the server from serving
            if config.compile != "auto":
                raise  # asked for by name: say so
            log.exception("decode step %s failed to warm up; using the eager step", decoder.mode)
            self._drop_native_ops()
            return None
        log.info("decode step %s warm-up took %.1f s", self.decode_mode, seconds)
        return decoder

    def _use_native_ops(self, config: ServerConfig) -> None:
        """A static step on CPU in float32 computes its attention with the native op
        (``kernels.cpu``, built here the first time), and, with the gather backend, its LoRA
        rows, and the sampler takes each row's largest logit with it; without the library,
        torch's products (gather + bmm for the rows) and ``torch.max``."""
        if not (self.device.type == "cpu" and self.dtype == torch.float32):
            return
        start = time.perf_counter()
        if not cpu_kernels.available():
            return
        log.info("native CPU ops ready in %.1f s", time.perf_counter() - start)
        self.kv_cache.decode_kernel = cpu_kernels.decode_attention
        self.row_max = cpu_kernels.row_max
        if config.lora_backend == "gather" and self.table.num_slots > 0:
            self.table.context.row_op = cpu_kernels.lora_rows

    def _drop_native_ops(self) -> None:
        self.kv_cache.decode_kernel = decode_attention
        self.row_max = torch_row_max
        self.table.context.row_op = None

    def check_adapter(self, adapter: Adapter) -> None:
        """Raise ``InvalidAdapter`` unless ``adapter`` fits this server's LoRA-enabled layers
        and its scale folded into B stays finite in the serving dtype and the slot tables'."""
        validate_adapter(
            adapter, self.lora_shapes, self.loaded.fingerprint, self.config.max_lora_rank
        )
        narrowest = min((self.dtype, self.lora_dtype), key=lambda d: torch.finfo(d).max)
        limit = torch.finfo(narrowest).max
        for module, w in adapter.modules.items():
            folded = float(w.B.abs().max()) * abs(w.scale)
            if folded > limit:
                raise WeightsOutOfRange(
                    f"adapter {adapter.name!r}: {module}'s B times its scale {w.scale:g} reaches "
                    f"{folded:.3g}, over {str(narrowest).removeprefix('torch.')}'s largest value"
                )

    def resident_adapters(self) -> dict[str, str]:
        """Adapter name -> the fastest tier holding its current version ("device", "host")."""
        device, host = self.cache.device_versions(), self.host.versions()
        tiers = {}
        for entry in self.registry.entries():
            if entry.version in device:
                tiers[entry.name] = "device"
            elif entry.version in host:
                tiers[entry.name] = "host"
        return tiers

    def router_state(self) -> RouterState:
        running, waiting = self.engine.adapters_in_flight()
        stats = self.engine.stats()
        return RouterState(
            max_lora=self.config.max_active_adapters,
            running_adapters=running,
            waiting_adapters=waiting,
            running=stats["running"],
            waiting=stats["waiting"],
            kv_usage=stats["kv_rows_used"] / max(1, stats["kv_rows_total"]),
            resident=self.resident_adapters(),
        )

    def residency(self) -> dict[str, int]:
        return {"disk": len(self.registry.entries()), **self.cache.resident()}

    def start(self) -> Runtime:
        if not self.adapters_dir.is_dir():
            raise ValueError(f"adapters directory {self.adapters_dir} does not exist")
        on_exiting_thread(self.registry.scan)
        self.watcher.start()
        self.engine.start()
        log.info(
            "model %s on %s (%s), %d adapters in %s",
            self.loaded.path,
            self.device,
            str(self.dtype).removeprefix("torch."),
            len(self.registry.entries()),
            self.adapters_dir,
        )
        return self

    def stop(self, grace: float | None = None) -> None:
        self.engine.shutdown(self.config.drain_grace if grace is None else grace)
        self.watcher.stop()
        self.cache.close()
