"""Exceptions raised by the engine.

Every error a user can cause derives from ``TextDiffSegError`` and carries a message that says
what to do about it. The CLI prints the message and exits non-zero; Slicer shows it in a dialog.
"""


class TextDiffSegError(Exception):
    """Base class of every error the engine raises on purpose."""


class InputImageError(TextDiffSegError):
    """The input image is missing, unreadable, or not a 3D scalar volume."""


class PromptError(TextDiffSegError):
    """The prompt is empty or names no known structure."""


class ModelError(TextDiffSegError):
    """A model folder is missing, corrupt, or does not match its config."""


class OutputError(TextDiffSegError):
    """An output exists already (and overwriting was not asked for) or cannot be written."""


class DataError(TextDiffSegError):
    """A training or evaluation dataset is missing, malformed, or lacks a requested structure."""


class SettingsError(TextDiffSegError, ValueError, TypeError):
    """A setting (number of proposals, seed, steps, training steps) is of the wrong type or out of range.

    It is a ``ValueError`` and a ``TypeError`` too, as Python code that passes a bad argument expects.
    """


class TextDiffSegWarning(UserWarning):
    """Base class of every warning the engine gives on purpose: the run goes on, and the user should know why.

    The CLI prints each as one line; the Slicer worker sends it with the results.
    """


class ScanWarning(TextDiffSegWarning):
    """The scan was read and will be segmented, but something about it is doubtful (``scan_checks``)."""


class EnsembleWarning(TextDiffSegWarning):
    """A structure is asked only of the models of an ensemble that know it (``ensemble.Ensemble``); ``structure``
    names it, so that the Slicer worker says it with that structure's result alone."""

    def __init__(self, message: str, structure: str):
        super().__init__(message)
        self.structure = structure
