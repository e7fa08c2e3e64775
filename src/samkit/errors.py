"""Errors samkit raises for bad input. Each message is one line that says what was wrong and what to do."""

from __future__ import annotations


class SamkitError(Exception):
    """Base class of every error samkit raises on purpose."""


class InputError(SamkitError, ValueError):
    """An image, prompt or option that samkit cannot use."""


class ImageError(InputError):
    """An image that cannot be read or is not 2D RGB/gray."""


class PromptError(InputError):
    """A point, label, box or mask prompt that is malformed or outside the image."""


class NotFoundError(InputError):
    """An id, name or path that samkit does not have (an image or object id, a file outside a folder)."""


class GoneError(NotFoundError):
    """Something samkit knew of that has disappeared, e.g. an image file deleted from disk."""


class AccessError(SamkitError):
    """A file or URL samkit may not read, or whose server refused or failed to give it."""


class StateError(SamkitError, RuntimeError):
    """An operation called in the wrong order, e.g. predict() before set_image()."""


class CheckpointError(SamkitError):
    """A checkpoint that is corrupt, truncated, of another architecture, or of the wrong hash."""


class OutputError(SamkitError):
    """An output that cannot be written (read-only or full disk, a file where a folder should be), or an
    output folder that another samkit run is writing to."""


class DownloadError(SamkitError):
    """A model file that could not be fetched from any of its sources."""


class MissingExtraError(SamkitError, ImportError):
    """A feature whose optional dependencies (a pip extra such as `samkit[app]`) are not installed."""
