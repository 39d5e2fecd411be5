"""What a storage backend offers the facade (:mod:`components.common.storage`), one backend per URI scheme.

The facade parses and validates every URI itself and hands a backend a :class:`Location`; a backend never
sees an unchecked URI and never imports the facade. The operations are the facade's, minus what is the same
on every backend (URI syntax, which markers ``local_output`` writes last and the conflict it reports).
"""
from __future__ import annotations

from pathlib import Path
from typing import ContextManager, NamedTuple, Protocol


class Location(NamedTuple):
    """A URI the facade has validated, split the way its backend needs it."""

    uri: str  # as the caller wrote it: error messages quote it
    bucket: str  # the gs:// bucket; "" for a local path
    path: str  # gs://: the object name in the bucket (may be "" or end in "/"); locally: the filesystem path


class Backend(Protocol):
    def operation(self, op: str, loc: Location) -> ContextManager[object]:
        """Run the block as one operation named ``op`` on ``loc``: on gs:// its requests share one deadline
        (``VLMTUNE_GCS_RETRY_DEADLINE_S``); each method call is an operation of its own unless one is open."""

    def read_bytes(self, loc: Location) -> bytes:
        """The file's bytes; FileNotFoundError if there is none, StorageError for a folder."""

    def write_bytes(self, loc: Location, data: bytes) -> None:
        """Write or overwrite atomically: a reader sees the old bytes or the new, never half."""

    def write_if_absent(self, loc: Location, data: bytes) -> bool:
        """Create-only write: True for exactly one of several racing writers, False if the file existed."""

    def exists(self, loc: Location) -> bool:
        """A file, or a folder (anything under it)."""

    def delete(self, loc: Location) -> None:
        """The file, or the folder and everything under it; nothing there is fine."""

    def list_files(self, loc: Location) -> list[str]:
        """Every file under the folder, as URIs (plain paths locally), sorted; [] if there is none."""

    def upload_dir(self, local_dir: Path, loc: Location, exclude: tuple[str, ...]) -> None:
        """Copy the tree under ``local_dir`` (an existing folder) to the folder, leaving out ``exclude``."""

    def download_dir(self, loc: Location, local_dir: Path) -> None:
        """Copy the folder's tree into ``local_dir``; FileNotFoundError if it is not a folder."""

    def download_files(self, pairs: list[tuple[Location, Path]]) -> None:
        """Copy each file to its local target (distinct targets); FileNotFoundError for a missing one."""

    def local_input(self, loc: Location) -> ContextManager[Path]:
        """A local file or folder holding the input while the block runs; FileNotFoundError if there is none."""

    def staging(self, loc: Location, stale: tuple[str, ...]) -> ContextManager[Path]:
        """A fresh, empty local folder for ``local_output``'s body, removed when the block ends.

        On entry the files named in ``stale`` (the completion markers) are deleted at ``loc``, before the
        body runs, and a target that cannot be a folder is refused.
        """

    def publish(self, staging: Path, loc: Location, exclude: tuple[str, ...]) -> None:
        """Move or copy everything in ``staging`` except ``exclude`` to the folder at ``loc``."""
