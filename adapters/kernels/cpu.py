"""Native CPU ops for the decode step: ``torch.ops.loraserve_cpu.lora_rows`` (the LoRA delta),
``torch.ops.loraserve_cpu.packed_linear`` (the base GEMM) and
``torch.ops.loraserve_cpu.decode_attention`` (attention with one query per row).

On CPU, a decode step's LoRA path is bound by the bytes of the adapters it reads: with 32
distinct adapters, each row streams its own ``A[s, :r]`` and ``B[s, :r]`` once. The gather
path (``index_select`` then ``bmm``) writes every gathered block out and reads it again, and
inductor's fused loop over the gather does no better (both ~1.7x the byte floor at hidden 512).
``csrc/lora_rows.cpp`` reads the tables in place, one row per sequence, split over torch's
threads, with vectorised inner loops: at the byte floor within noise (``bench/engine.py``).

Semantics (those of ``BatchedLoRALinear`` for rows on one slot each)::

    lora_rows(x [n, in], y [n, out], A [S, R, in], B [S, R, out], slots [n], r)
        -> y + (x[b] @ A[slots[b], :r].T) @ B[slots[b], :r]  for every row b (slot 0: y[b])

    lora_rows(x, y, A, B, slots [n, K], r, weights [n, K])   rows that mix adapters
        -> y + sum_k weights[b, k] * (x[b] @ A[slots[b, k], :r].T) @ B[slots[b, k], :r]

A mixture member on slot 0 is padding and costs nothing, so a step may route every row through
``K`` columns (one compiled graph) whether it mixes adapters or not. ``x`` and ``y`` are
float32; the tables are float32, or bfloat16 / float16 (``--lora-dtype``), widened to float32 as
they are read, so the bytes streamed halve and the products still accumulate in float32.

``packed_linear(x, weight, bias)`` (``csrc/packed_linear.cpp``) is the Python custom op of
``loraserve.adapters.models.packed`` in C++: the same registry of packed twins, without the
~45 us the Python op spends in dispatch on every call (a decode step makes one call per
Linear: 43 at hidden 512, 211 for SmolLM2), and, on a CPU with AVX-512, its own GEMM instead
of oneDNN's: a decode step's weights come from memory (SmolLM2's are 537 MB), and this one
prefetches the next block of the weight while it computes the current one (the source says
how, and how much faster).

``decode_attention(q, k, v, mask)`` (``csrc/decode_attention.cpp``) is
``loraserve.adapters.models.attention.decode_attention`` in one loop per (row, KV head), reading
K and V in place from the cache's views, prefetched: a step's attention is bound by those bytes,
and inductor's lowering of the torch version reads them at about half the machine's bandwidth
(the source says how much).

The library is compiled from source the first time a server asks for it (about 20 s with g++; the
same compiler inductor needs) into a per-user cache keyed by the source, torch's version, the
compiler and this CPU's flags, then loaded with ``torch.ops.load_library``. It is registered
with fake (meta) implementations, so compiled blocks call its ops as opaque kernels.
``load()`` raises ``KernelUnavailable`` when it cannot be built here: callers fall back to
the gather path and the Python packed op.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from loraserve.adapters.user_cache import user_cache_dir
from torch import Tensor

from . import KernelUnavailable

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(
    CSRC / n for n in ("lora_rows.cpp", "packed_linear.cpp", "decode_attention.cpp", "greedy.cpp")
)
HEADERS = (CSRC / "dots.h",)  # what the sources include: part of the library's key
# -fno-math-errno: expf in a loop vectorises (libmvec) only when it need not set errno
FLAGS = [
    *("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-std=c++17"),
    *("-shared", "-fPIC", "-w"),
]
BUILD_TIMEOUT_S = 300
_lock = threading.Lock()


def cache_dir() -> Path:
    """Where built ops are kept: ``$LORASERVE_KERNEL_CACHE``, else under the user's cache."""
    return user_cache_dir("kernels", "LORASERVE_KERNEL_CACHE")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler_version(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.splitlines()[0] if out.stdout else ""


def library_path(cxx: str) -> Path:
    """The built library for this source, torch, compiler and CPU (``-march=native``)."""
    key = hashlib.sha256()
    for part in (
        *(source.read_bytes() for source in (*SOURCES, *HEADERS)),
        torch.__version__.encode(),
        _compiler_version(cxx).encode(),
        " ".join(FLAGS).encode(),
        _cpu_flags().encode(),
    ):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"loraserve_cpu-{key.hexdigest()[:20]}.so"


def build(cxx: str, target: Path) -> None:
    """Compile ``SOURCES`` into the library ``target`` (written to a temporary file, renamed
    when done, so concurrent builders and a killed build never leave a half-written library
    behind)."""
    from torch.utils.cpp_extension import include_paths, library_paths

    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    torch_lib = library_paths()[0]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    command = [
        cxx,
        *FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *[f"-I{p}" for p in include_paths()],
        *map(str, SOURCES),
        "-o",
        tmp,
        f"-L{torch_lib}",
        "-lc10",
        "-ltorch_cpu",
        f"-Wl,-rpath,{torch_lib}",
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise KernelUnavailable(
                f"building the native CPU ops failed ({cxx} exit {done.returncode}): "
                f"{done.stderr.strip()[-2000:]}"
            )
        os.replace(tmp, target)
    except subprocess.TimeoutExpired as e:
        raise KernelUnavailable(f"building the native CPU ops took over {BUILD_TIMEOUT_S} s") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would build CPU kernels with (and this op), if there is one."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


_loaded: bool | KernelUnavailable = False  # True, or the reason it cannot be loaded


def load() -> None:
    """Build (once per cache) and register the ops (``torch.ops.loraserve_cpu.*``).

    Raises ``KernelUnavailable`` when there is no C++ compiler or the build fails; the outcome
    is kept for the process, so a failed build is not retried."""
    global _loaded
    with _lock:
        if _loaded is False:
            try:
                _build_and_register()
                _loaded = True
            except KernelUnavailable as e:
                _loaded = e
        if _loaded is not True:
            raise _loaded


def _build_and_register() -> None:
    cxx = cxx_compiler()
    if cxx is None:
        raise KernelUnavailable("the native CPU ops need a C++ compiler (g++, c++ or clang++)")
    target = library_path(cxx)
    if not target.exists():
        log.info("building the native CPU ops into %s (once per machine and torch version)", target)
        build(cxx, target)
    try:
        torch.ops.load_library(str(target))
    except OSError as e:
        raise KernelUnavailable(f"loading the native CPU ops {target} failed: {e}") from e
    torch.library.register_fake("loraserve_cpu::lora_rows")(_fake)
    torch.library.register_fake("loraserve_cpu::packed_linear")(_fake_linear)
    torch.library.register_fake("loraserve_cpu::decode_attention")(_fake_attention)
    torch.library.register_fake("loraserve_cpu::row_max")(_fake_row_max)


def _fake(
    x: Tensor, y: Tensor, A: Tensor, B: Tensor, slots: Tensor, r, weights: Tensor | None = None
) -> Tensor:
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _fake_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _fake_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _fake_row_max(logits: Tensor) -> tuple[Tensor, Tensor]:
    n = logits.shape[0]
    return logits.new_empty(n), logits.new_empty(n, dtype=torch.long)


def available() -> bool:
    """Can the op be built and loaded here? (Builds it the first time.)"""
    try:
        load()
    except KernelUnavailable as e:
        log.info("native CPU ops unavailable: %s", e)
        return False
    return True


def lora_rows(
    x: Tensor,
    y: Tensor,
    A: Tensor,
    B: Tensor,
    slots: Tensor,
    rank,
    weights: Tensor | None = None,
) -> Tensor:
    """``y + (x[b] @ A[slots[b], :rank].T) @ B[slots[b], :rank]`` for each row ``b`` of
    ``x [n, in]`` / ``y [n, out]`` (float32, CPU); with ``slots [n, K]`` and ``weights [n, K]``
    the weighted sum over each row's ``K`` slots. ``load()`` must have succeeded."""
    return torch.ops.loraserve_cpu.lora_rows(x, y, A, B, slots, rank, weights)


def packed_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` through ``weight``'s packed twin, looked up (packed on
    first use, and again after an in-place write) in the library's registry: the native twin
    of ``loraserve.adapters.models.packed.packed_linear``, computed by the library's own
    AVX-512 GEMM where it was built for AVX-512 (``packed_kernel()``), else by oneDNN. Above
    512 rows (a prefill) it calls the BLAS on ``weight`` itself. ``load()`` must have
    succeeded."""
    return torch.ops.loraserve_cpu.packed_linear(x, weight, bias)


def packed_kernel() -> str:
    """What computes ``packed_linear`` at decode sizes: ``"panels"`` (the library's AVX-512
    GEMM over weights packed in 48-column panels) or ``"onednn"`` (a CPU without AVX-512).
    ``load()`` must have succeeded."""
    return torch.ops.loraserve_cpu.packed_kernel()


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """``softmax(q k^T / sqrt(D), masked) v`` for one query per row: q ``[B, H, 1, D]``, k and v
    ``[B, Hkv, T, D]`` (views of the KV cache), mask bool ``[B, 1, 1, T]``, float32 (the
    semantics of ``models.attention.decode_attention``, except that a masked position adds
    nothing even when it is not finite). ``load()`` must have succeeded."""
    return torch.ops.loraserve_cpu.decode_attention(q, k, v, mask)


def row_max(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.max(logits, dim=-1)`` for float32 CPU logits ``[n, V]``: each row's largest
    value and the index of its first occurrence; a row with a NaN gives NaN and its first NaN's
    index. One pass per row (ATen's max-with-index takes 0.5-1.1 ms over 32 x 49152 logits on
    2 cores). ``load()`` must have succeeded."""
    return torch.ops.loraserve_cpu.row_max(logits)


def forget_packed() -> None:
    """Drop every packed twin the library holds (tests), if it is loaded."""
    if _loaded is True:
        torch.ops.loraserve_cpu.forget_packed()
