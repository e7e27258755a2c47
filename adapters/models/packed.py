"""Packed Linear weights: the CPU GEMM of the compiled decode step.

On CPU, PyTorch's ``F.linear`` calls the BLAS sgemm (MKL in the stock wheel), which at decode
shapes (M = batch, a few dozen rows) runs far from the machine's peak, and further still on AMD
CPUs. oneDNN's linear on a weight reordered once into its blocked layout runs the same product
1.5-2.5x faster there (``bench/``; it is what inductor's ``freezing`` does to a model). The
serving weights are frozen, so the reorder is paid once at start-up.

The packed weight is an opaque oneDNN tensor that ``torch.compile`` cannot trace, so the op
``loraserve::packed_linear(x, weight, bias)`` takes the ordinary dense weight (shape, dtype and
identity for the compiler) and looks its packed twin up by storage at run time. ``PackedLinear``
is an ``nn.Linear`` whose forward calls it: same parameters, same state dict, same module path
(LoRA wrappers and checkpoints see nothing different). The contract: a packed weight is not
written afterwards (serving weights are frozen; ``pack_linears`` is a serving-time step). An
in-place write through the tensor bumps its version and the twin is packed again; a write
through ``.data`` is invisible to that check. Cost: the packed copies, one more copy of every
Linear weight in host memory.

Where the native CPU library is built (``loraserve.adapters.kernels.cpu``), ``pack_linears(...,
native=True)`` computes through its C++ twin of this op, ``loraserve_cpu::packed_linear``: the
same contract and registry semantics, without the Python op's dispatch cost on every call, and
on a CPU with AVX-512 its own GEMM instead of oneDNN's. A decode step reads every weight from
memory once (SmolLM2-135M's Linears are 537 MB), and oneDNN's GEMM does not hide that read;
the library packs each weight into panels of 48 output columns and prefetches the next
panel while it computes this one (SmolLM2-135M-shaped decode step, batch 32, 2 Xeon cores:
67-69 -> 56-58 ms).

``fuse_projections`` goes first: q/k/v and gate/up, which read one input, become one Linear
each (their weights concatenated, the separate ones views of it), so one packed GEMM of the
summed width replaces three or two narrow ones. The fused Linear adds keys to the module's
state dict (``...fused.weight``); the checkpoint's own keys stay.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

# (data_ptr, shape, stride, dtype) of a dense weight -> (the weight, its version, its packed
# twin); an entry goes when its weight is freed
_PACKED: dict[tuple, tuple[weakref.ref, int, Tensor]] = {}
PACK_BATCH_HINT = 32  # the M oneDNN lays the weight out for; any M runs


def can_pack(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Packed linears run here: float32 on a CPU with oneDNN."""
    return (
        torch.device(device).type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def _key(weight: Tensor) -> tuple:
    return (weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype)


def packed_weight(weight: Tensor) -> Tensor:
    """The packed twin of ``weight``, made on first use, and made again if the weight it was
    made from is gone (its memory reused by another tensor) or was written since."""
    key = _key(weight)
    entry = _PACKED.get(key)
    if entry is not None:
        source, version, packed = entry
        alive = source()
        if alive is not None and _key(alive) == key and alive._version == version:
            return packed
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)
    _PACKED[key] = (weakref.ref(weight, lambda ref: _forget(key, ref)), weight._version, packed)
    return packed


def _forget(key: tuple, ref: weakref.ref) -> None:
    """A packed weight's source was freed: drop its twin (unless the key was reused since)."""
    entry = _PACKED.get(key)
    if entry is not None and entry[0] is ref:
        del _PACKED[key]


@torch.library.custom_op("loraserve::packed_linear", mutates_args=())
def packed_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)`` through ``weight``'s oneDNN-packed twin."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight(weight), bias, "none", [], "")


@packed_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` computed through its packed weight (see the module docstring); through
    the native op when ``native``. Its twin is packed on the first call (a Linear that
    ``fuse_projections`` made part of a fused one is never called, and never packed)."""

    native = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, native: bool = False) -> PackedLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias  # the same Parameters, not copies
        new.native = native
        return new

    def forward(self, x: Tensor) -> Tensor:
        if self.native:
            return torch.ops.loraserve_cpu.packed_linear(x, self.weight, self.bias)
        return packed_linear(x, self.weight, self.bias)


def pack_linears(model: nn.Module, native: bool = False) -> int:
    """Swap every plain ``nn.Linear`` of ``model`` (LoRA wrappers' inner ones included) for a
    ``PackedLinear`` on the same parameters; returns how many. Call only where ``can_pack``;
    ``native`` only once ``loraserve.adapters.kernels.cpu.load()`` has succeeded."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear.from_linear(getattr(parent, child), native))
    return len(names)


def fuse_projections(model: nn.Module) -> int:
    """Make the projections that read one input one GEMM: q, k and v of every attention, gate
    and up of every gated MLP (modules whose ``fusable`` names them), where each is a plain
    Linear or a ``BatchedLoRALinear`` around one, with biases on all or none. The parent's
    ``fused`` becomes one Linear over their weights concatenated, and their own weights become
    views of it (no second copy); ``models.model.project`` then runs the fused GEMM and adds
    each wrapper's LoRA delta to its slice. A serving-time step, before ``pack_linears``: at
    decode shapes one GEMM of the summed width runs nearer the machine's peak than three or
    two narrow ones, and makes one call instead of several (SmolLM2-135M's Linears at batch 32,
    packed, 2 Xeon cores: 67 -> 60.5 ms a step). Returns how many groups were fused."""
    from ..lora import BatchedLoRALinear

    groups = 0
    for parent in model.modules():
        names = getattr(parent, "fusable", ())
        if not names or parent.fused is not None:
            continue
        members = [getattr(parent, name) for name in names]
        if not all(isinstance(m, (nn.Linear, BatchedLoRALinear)) for m in members):
            continue
        bases = [m if isinstance(m, nn.Linear) else m.linear for m in members]
        if len({b.bias is None for b in bases}) > 1:
            continue
        weight = torch.cat([b.weight.detach() for b in bases])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=False)
        if bases[0].bias is not None:
            fused.bias = nn.Parameter(torch.cat([b.bias.detach() for b in bases]), False)
        widths = [b.out_features for b in bases]
        for b, w in zip(bases, weight.split(widths)):
            b.weight = nn.Parameter(w, requires_grad=False)
        if fused.bias is not None:
            for b, v in zip(bases, fused.bias.split(widths)):
                b.bias = nn.Parameter(v, requires_grad=False)
        parent.fused = fused
        groups += 1
    return groups


def forget_packed() -> None:
    """Drop every packed twin, the native library's too (tests; a process serves one model
    for its life)."""
    from ..kernels import cpu

    _PACKED.clear()
    cpu.forget_packed()
