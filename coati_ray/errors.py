"""Errors users see. Each says what was wrong, where (flag, file, row, field) and what was expected.

Launchers catch `CoatiError` and print its message without a traceback; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class CoatiError(Exception):
    """Base class for errors caused by the user's input or environment, not by a bug."""


class ConfigError(CoatiError, ValueError):
    """A flag or config field has a value we cannot run with."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"--{field}: {message}")

    def __reduce__(self):  # errors cross process boundaries (Ray actors) by pickling
        return (type(self), (self.field, self.message))


class DataError(CoatiError, ValueError):
    """A dataset file is missing, empty, malformed, or lacks a field.

    `row` is 0-based within the data rows; `line` is the 1-based line in the file when known.
    """

    def __init__(self, path: str, message: str, row: int | None = None, field: str | None = None,
                 line: int | None = None):
        self.path, self.message, self.row, self.field, self.line = path, message, row, field, line
        where = [str(path)]
        if line is not None:
            where.append(f"line {line}")
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}")

    def __reduce__(self):
        return (type(self), (self.path, self.message, self.row, self.field, self.line))


class ModelLoadError(CoatiError, OSError):
    """A model path does not exist or does not hold a loadable model."""


class MissingExtraError(CoatiError, ImportError):
    """An optional engine was requested but its extra is not installed."""

    def __init__(self, package: str, extra: str, purpose: str):
        self.package, self.extra, self.purpose = package, extra, purpose
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed. "
            f"Install it with: pip install 'coati_ray[{extra}]'"
        )

    def __reduce__(self):
        return (type(self), (self.package, self.extra, self.purpose))


def require(package: str, extra: str, purpose: str):
    """Import an optional package lazily, or raise MissingExtraError naming the extra."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingExtraError(package, extra, purpose) from e


class RunStopped(CoatiError, RuntimeError):
    """A run stopped because part of the cluster failed (e.g. a trainer actor died); its message
    names the failure, the checkpoint to continue from and how."""
