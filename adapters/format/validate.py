"""``validate_adapter``: can this adapter run on this base model?

It checks module names (every adapted module is a linear layer of the base), shapes, that every
module the config targets has weights, the rank limit and the base fingerprint, each failure a
specific ``InvalidAdapter``. The config's patterns are matched within one ``MatchBudget`` of
their own; one too costly to match is an ``InvalidAdapterConfig``.
"""

from __future__ import annotations

from loraserve.adapters.lora import MatchBudget, PatternError

from .adapter import Adapter
from .errors import (
    FingerprintMismatch,
    InvalidAdapterConfig,
    MissingWeights,
    RankTooLarge,
    ShapeMismatch,
    UnknownTargetModule,
)


def _show(names, limit: int = 4) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def validate_adapter(
    adapter: Adapter,
    shapes: dict[str, tuple[int, int]],
    fingerprint: str | None = None,
    max_rank: int | None = None,
) -> None:
    """Raise the specific ``InvalidAdapter`` if ``adapter`` cannot run on this base model.

    ``shapes``: the base's linear layers, name -> (in_features, out_features) (``linear_shapes``).
    The fingerprint is only compared when both sides know one (PEFT folders carry none). The
    config's patterns are matched within one ``MatchBudget``; one too costly to match is an
    ``InvalidAdapterConfig``.
    """
    where = f"adapter {adapter.name!r}"
    theirs = adapter.config.base_fingerprint
    if fingerprint is not None and theirs is not None and theirs != fingerprint:
        raise FingerprintMismatch(
            f"{where} was made for base model fingerprint {theirs}, this base is {fingerprint} "
            f"(adapter base_model: {adapter.config.base_model})"
        )
    unknown = set(adapter.modules) - set(shapes)
    if unknown:
        raise UnknownTargetModule(
            f"{where} has weights for modules that are not linear layers of the base model: "
            f"{_show(unknown)} (base has e.g. {_show(list(shapes)[:3], 3)})"
        )
    for module, w in sorted(adapter.modules.items()):
        in_features, out_features = shapes[module]
        if w.A.shape[0] != in_features or w.B.shape[1] != out_features:
            raise ShapeMismatch(
                f"{where}: {module} is {in_features} -> {out_features} in the base model but the "
                f"adapter's A is [{w.A.shape[0]}, r] and B [r, {w.B.shape[1]}] (in -> out)"
            )
    if adapter.config.target_modules is not None:
        budget = MatchBudget()
        try:
            targeted = {n for n in shapes if adapter.config.targets(n, budget)}
        except PatternError as e:
            raise InvalidAdapterConfig(f"{where}: {e}") from None
        missing = targeted - set(adapter.modules)
        if missing:
            raise MissingWeights(
                f"{where}: target_modules={_show_targets(adapter.config.target_modules)} "
                f"selects {_show(missing)} but the file has no weights for them"
            )
    if max_rank is not None and adapter.rank > max_rank:
        raise RankTooLarge(
            f"{where} has rank {adapter.rank}, above this server's max rank {max_rank}"
        )


def _show_targets(targets) -> str:
    return repr(list(targets)) if isinstance(targets, tuple) else repr(targets)
