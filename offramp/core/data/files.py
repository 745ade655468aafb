"""A folder or a zip archive of data files, read the same way.

Datasets arrive as either, and a zip may wrap everything in one top-level
folder; callers only see sorted relative POSIX names and their bytes.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from types import TracebackType

from offramp.core.errors import DataError


def _hidden(name: str) -> bool:
    """Skip OS litter (``.DS_Store``, ``__MACOSX/``) that archivers add."""
    return any(part.startswith(".") or part == "__MACOSX" for part in PurePosixPath(name).parts)


class FileSource:
    """Sorted relative names of the regular files under a folder or in a zip."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise DataError(f"data path '{path}' does not exist")
        self._zip: zipfile.ZipFile | None = None
        self._is_zip = False
        if self.path.is_dir():
            names = [
                Path(dirpath, f).relative_to(self.path).as_posix()
                for dirpath, _, filenames in os.walk(self.path)
                for f in filenames
            ]
        elif zipfile.is_zipfile(self.path):
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as e:
                raise DataError(f"cannot open zip archive '{self.path}': {e}") from None
            self._is_zip = True
            names = [i.filename for i in self._zip.infolist() if not i.is_dir()]
        else:
            raise DataError(f"data path '{self.path}' is neither a folder nor a .zip archive")
        self.names: list[str] = sorted(n for n in names if not _hidden(n))

    def read(self, name: str) -> bytes:
        """The bytes of one file; a read failure names the file and the source."""
        try:
            if self._is_zip:
                if self._zip is None:  # reopened after close(): a listing may be decoded twice
                    self._zip = zipfile.ZipFile(self.path)
                return self._zip.read(name)
            return (self.path / name).read_bytes()
        except (zipfile.BadZipFile, zlib.error, NotImplementedError, OSError, EOFError) as e:
            raise DataError(f"cannot read '{name}' in {self.path}: {e}") from None

    def close(self) -> None:
        """Release the archive; a later ``read`` opens it again."""
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
