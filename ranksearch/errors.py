"""Error types. Every error the library raises on bad input derives from `RankSearchError`."""

from __future__ import annotations


class RankSearchError(Exception):
    """Base class of every ranksearch error; the message says what was wrong and what to do."""


class InvalidRankError(RankSearchError, ValueError):
    """A rank is zero, negative, above the layer's maximum or of the wrong form."""


class UnknownMethodError(RankSearchError, KeyError):
    """A factorization name is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class UnknownLayerError(RankSearchError, KeyError):
    """A layer name is not a site of the model."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NotAdmittedError(RankSearchError, ValueError):
    """The layer does not admit this factorization (e.g. a depthwise convolution, or cp3 on a
    linear layer)."""


class NoDecomposableLayersError(RankSearchError, ValueError):
    """The model has no Conv2d or Linear layer that can be factorized."""


class InputShapeError(RankSearchError, ValueError):
    """The example input does not fit the model."""


class DecompositionError(RankSearchError, RuntimeError):
    """A decomposition failed numerically (e.g. CP factors that are not finite)."""


class ConfigError(RankSearchError, ValueError):
    """A configuration or its JSON form is malformed."""


class ConstraintError(RankSearchError, ValueError):
    """A constraint, objective, reference point or point set is malformed (unknown metric,
    bad operator or value, wrong shape)."""


class UnknownModelError(RankSearchError, KeyError):
    """A reference model name is not registered."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class TaskError(RankSearchError, ValueError):
    """A task, its data or a user task file is malformed or unknown."""


class DatasetNotFoundError(TaskError, FileNotFoundError):
    """A data set's folder or one of its files is missing; the message says how to get it."""


class ExportError(RankSearchError, RuntimeError):
    """A model cannot be written in the format asked, or the written file does not reproduce
    it (then nothing is written)."""


class ModelFileError(RankSearchError, ValueError):
    """A file given to `ranksearch.load` is missing, empty, truncated, corrupt, or not a
    compressed model written by `ranksearch.save`."""


class OptionError(RankSearchError, ValueError):
    """A strategy option has a bad value; the message names the strategy, the option, the
    value and what is valid (see `ranksearch.options`)."""


class UnknownStrategyError(RankSearchError, KeyError):
    """No strategy of that name is registered."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConstraintUnreachableError(RankSearchError):
    """No configuration of the space can meet a constraint."""


class CandidateFailed(RankSearchError):
    """A candidate's fine-tuning diverged or produced a non-finite loss."""


class StoreError(RankSearchError):
    """The store cannot be opened or does not match the search."""
