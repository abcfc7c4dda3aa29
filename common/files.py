"""The one way the project writes and reads its files.

Writes are atomic (:func:`atomic_write`): under a unique temporary name, fsynced, renamed, with the
umask's mode, so readers see the old file or the new one, never half of one; two writers of the same
file never share a temporary name; every file gets ``0666`` minus the user's umask, like any file
the user creates (``mkstemp`` alone would leave 0600). Temporary files left by a killed process end
in :data:`TEMP_SUFFIX` and are removed by :func:`remove_orphaned_temps` on the next run.

JSONL is read line by line through :func:`jsonl_objects`; each caller decides what a bad line means
(the run store drops a torn last line, user files fail with one line naming it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["TEMP_SUFFIX", "JsonlLineError", "atomic_folder", "atomic_write", "atomic_write_json", "file_mode", "folder_mode",
           "jsonl_objects", "remove_orphaned_temps"]

#: ``.<name>.<random>.safequant-tmp``: what :func:`atomic_write` leaves behind when killed mid-write.
TEMP_SUFFIX = ".safequant-tmp"


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set back at once
    os.umask(mask)
    return mask


def file_mode() -> int:
    """``0666`` minus the process umask: the mode every file the project writes gets."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """``0777`` minus the process umask: the mode of folders made with ``mkdtemp`` (0700 otherwise)."""
    return 0o777 & ~_umask()


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8 with ``\\n`` newlines, or bytes) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of ``target`` to fill; when the block ends without error it replaces
    ``target``, so a crash leaves the old folder (or none), never half a new one. Files get the
    umask's modes (``mkdtemp``/``mkstemp`` make them private)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=TEMP_SUFFIX))
    try:
        os.chmod(tmp, folder_mode())
        yield tmp
        for file in tmp.iterdir():
            if file.is_file():
                os.chmod(file, file_mode())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2, end: str = "\n",
                      default: Any = str) -> None:
    """``obj`` as JSON (``indent``, then ``end``), written atomically; ``default`` turns values
    JSON lacks (paths, numpy scalars) into something it has."""
    atomic_write(path, json.dumps(obj, indent=indent, default=default) + end)


def remove_orphaned_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files a killed writer left anywhere under ``folder``; returns them.

    Call it only while holding the folder's lock (no live writer can own one of them then).
    """
    removed = []
    for parent, _dirs, files in os.walk(folder):  # never follows links out of the folder
        for name in files:
            if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                tmp = Path(parent) / name
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


class JsonlLineError(ValueError):
    """A JSONL line that is not JSON: ``lineno`` (1-based) and the decoder's ``msg``."""

    def __init__(self, lineno: int, msg: str) -> None:
        super().__init__(f"line {lineno} is not valid JSON ({msg})")
        self.lineno, self.msg = lineno, msg


def jsonl_objects(lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` for every non-blank line; a line that is not JSON raises
    :class:`JsonlLineError` when it is reached (values before it have been yielded)."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise JsonlLineError(lineno, exc.msg) from None
