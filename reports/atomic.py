"""The project's atomic writer, as the report modules import it; it lives in :mod:`common.files`
(the bottom of the import graph) so that ``quantizers`` and ``probes`` share it without importing
``reports``."""

import os  # noqa: F401  (kept: callers reach os.replace through this module)

from common.files import TEMP_SUFFIX, atomic_write, file_mode, folder_mode, remove_orphaned_temps

__all__ = ["TEMP_SUFFIX", "atomic_write", "file_mode", "folder_mode", "remove_orphaned_temps"]
