"""The errors storage raises, apart from the facade so that the backends can raise them without importing it."""
from __future__ import annotations


class StorageError(RuntimeError):
    """A storage operation failed in a way the caller should report to the user."""


class BucketNotFoundError(StorageError):
    """The gs:// bucket a URI names does not exist (or the account cannot see it)."""
