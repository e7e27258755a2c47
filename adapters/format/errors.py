"""What can be wrong with an adapter file: one ``InvalidAdapter`` subclass per problem.

Every reader and validator in ``loraserve.adapters.format`` raises only these for a bad file
(``OSError``
when a file cannot be read at all); each message names the file and the problem. They subclass
``ValueError``, and the server maps ``InvalidAdapter`` to FAILED_PRECONDITION.
"""


class InvalidAdapter(ValueError):
    """An adapter file that cannot be served; the message says why."""


class InvalidAdapterName(InvalidAdapter):
    pass


class InvalidAdapterConfig(InvalidAdapter):
    pass


class CorruptAdapterFile(InvalidAdapter):
    pass


class AdapterTooLarge(InvalidAdapter):
    pass


class UnsupportedAdapter(InvalidAdapter):
    pass


class UnknownTargetModule(InvalidAdapter):
    pass


class MissingWeights(InvalidAdapter):
    pass


class ShapeMismatch(InvalidAdapter):
    pass


class RankTooLarge(InvalidAdapter):
    pass


class FingerprintMismatch(InvalidAdapter):
    pass


class NonFiniteWeights(InvalidAdapter):
    """A LoRA tensor holds NaN or an infinity."""


class WeightsOutOfRange(InvalidAdapter):
    """Finite LoRA weights beyond float16's range: no trained LoRA has them."""
