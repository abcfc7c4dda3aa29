"""The one way the project writes a file: atomically, under a unique temporary name, with the umask's mode.

Every writer (run store, report, CSV exports, probe tables and figures, JUnit) goes through
:func:`atomic_write`, so readers see the old file or the new one, never half of one; two writers of
the same file never share a temporary name (a fixed ``.name.tmp`` made two audits on one run
directory crash); and every file gets the same permissions, ``0666`` minus the user's umask, like
any file the user creates (``mkstemp`` alone would leave 0600). Temporary files left by a killed
process end in :data:`TEMP_SUFFIX` and are removed by :func:`remove_orphaned_temps` on the next run.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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
