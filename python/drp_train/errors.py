"""Errors of the training layer.

Every error a user can cause (a bad option, a missing dataset, a hostile file, an
unwritable output folder) derives from ``DrpTrainError``. The ``drp`` command turns
it into one line on stderr, ``drp: error: <message>``, and exits with its
``exit_code`` (2 for misuse, 1 for a run that failed on its own).
"""

__all__ = [
    "DrpTrainError",
    "CLIError",
    "ConfigError",
    "DatasetError",
    "CheckpointError",
    "OutputDirError",
    "NonFiniteLossError",
    "TrainingInterrupted",
]


class DrpTrainError(Exception):
    """Base of the errors the ``drp`` command reports in one line."""

    exit_code = 2


class CLIError(DrpTrainError):
    """Misuse of a ``drp`` subcommand (raised by the subcommand runners)."""


class ConfigError(DrpTrainError, ValueError):
    """An impossible training option (names the option and the expected value)."""


class DatasetError(DrpTrainError, ValueError):
    """A dataset that is missing, corrupt or refused (names the path and how to get the data)."""


class CheckpointError(DrpTrainError, ValueError):
    """A checkpoint that is missing, corrupt, of the wrong kind or needs more than plain data."""


class OutputDirError(DrpTrainError, RuntimeError):
    """An output folder that cannot hold the run (unwritable, full, or already used)."""


class NonFiniteLossError(DrpTrainError, RuntimeError):
    """The training loss became NaN or Inf; the run stopped without saving a checkpoint."""

    exit_code = 1


class TrainingInterrupted(DrpTrainError, KeyboardInterrupt):
    """Ctrl-C stopped a run after its state was saved to ``last.pt``; the message says how to resume."""

    exit_code = 130
