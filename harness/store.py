"""The run directory: atomic summary and row files, resumable per-variant work, a lock, a shared cache.

Layout (docs/architecture.md): `summary.json` and `rows.jsonl` are rewritten atomically (temp file
+ rename, `reports.atomic`) after each variant, so readers never see half a file. Work in progress
lives in `work/<folder>/` (a safe folder name derived from the variant's label, carrying a marker
file so that only folders this store made are ever deleted), keyed by a hash of everything that
decides the result (model, tokenizer and variant fingerprints, generation and judge settings);
each cached row also records the hash of its prompt's text, so an edited prompt is regenerated
alone. Rows are appended per batch and flushed, so an interrupted run resumes from the last
finished batch; a corrupt `meta.json` or a garbage cached line is recomputed, never fatal.

The run directory is locked for the whole run (`filelock`): a second audit on the same `--out`
fails at once with one line. Content-keyed results are also kept in a cache shared by every run
directory (`--cache-dir`), so a second audit of the same model reuses the FP generations.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import logging
import shutil
from contextlib import contextmanager
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from harness.errors import UserError
from common.files import JsonlLineError, atomic_write, atomic_write_json, file_mode, jsonl_objects, remove_orphaned_temps

# One definition for the writer and every reader (reports.schema holds the migrations).
from reports.schema import SCHEMA_VERSION  # noqa: E402,F401


log = logging.getLogger(__name__)

#: Written into every work folder this store creates; a folder without it is never deleted.
WORK_MARKER = ".safequant-work"
LOCK_FILE = ".safequant.lock"


#: Environment variable naming the shared cache folder (``none`` turns caching across runs off).
CACHE_DIR_ENV = "SAFEQUANT_CACHE_DIR"


def resolve_cache_dir(setting: str | os.PathLike | None = "auto") -> Path | None:
    """The cache folder shared by run directories and processes, or None when it is off.

    ``auto``: ``$SAFEQUANT_CACHE_DIR``, else ``$XDG_CACHE_HOME/safequant``, else
    ``~/.cache/safequant`` (an empty variable counts as unset); ``none``/``off`` (also as the
    variable's value), an empty setting or None: no cache; anything else is the folder. The one rule for the audit's results cache (``--cache-dir``) and
    the chat-calibration text cache (harness/calibration_data.py).
    """
    if setting is None:
        return None
    chosen = os.fspath(setting)
    if chosen == "auto":
        chosen = os.environ.get(CACHE_DIR_ENV) or str(
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "safequant")
    return None if chosen.strip().lower() in ("none", "off", "") else Path(chosen).expanduser()


def stable_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


#: Write `text` to `path` so that readers see the old file or the new one, never a mix.
atomic_write_text = atomic_write


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; a torn last line (from an interrupted append) is dropped."""
    rows = []
    if not path.is_file():
        return rows
    with path.open(encoding="utf-8") as fh:
        try:
            rows.extend(obj for _lineno, obj in jsonl_objects(fh))
        except JsonlLineError:
            pass
    return rows


def check_writable(out_dir: Path) -> None:
    """Fail before any work starts when the output directory cannot be created or written."""
    probe_dir = out_dir
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise UserError(f"output path {str(out_dir)!r} is inside a file ({probe_dir}): choose another --out")
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise UserError(f"output directory {str(out_dir)!r} is not writable (no write permission on {probe_dir}): choose another --out")


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


def work_folder_name(label: str) -> str:
    """A folder name for a variant label: the label itself when it is plain (letters, digits,
    ``. _ -``, not starting with a dot), else a slug plus a hash of the label, so two labels never
    share a folder and no label can name a path (``..``, ``/``, a drive) outside ``work/``."""
    if _PLAIN_NAME.fullmatch(label) and ".." not in label:
        return label
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._")[:60]
    return f"{slug or 'variant'}-{hashlib.sha256(label.encode()).hexdigest()[:8]}"


def _read_rows(path: Path) -> list[dict]:
    """Cached rows of one file; lines that are not a row (a torn tail, garbage) are dropped and the
    file is rewritten without them, so the next run recomputes those prompts instead of sticking."""
    if not path.is_file():
        return []
    rows, dropped = [], 0
    data = path.read_bytes()
    for line in data.splitlines():
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            row = None
        if isinstance(row, dict) and isinstance(row.get("id"), str):
            rows.append(row)
        else:
            dropped += 1
    if dropped or (rows and not data.endswith(b"\n")):
        log.warning("%s: %d unreadable cached lines dropped; their prompts are recomputed", path, dropped)
        atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def _append_rows(path: Path, rows: Iterable[dict]) -> None:
    """Append rows and flush them to disk: the resume point of an interrupted run."""
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):  # a torn tail from a kill mid-append
            atomic_write(path, data[: data.rfind(b"\n") + 1])
    with path.open("a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(path, file_mode())


def _read_json(path: Path):
    """A cached JSON value, or None when it is missing or unreadable (then it is recomputed)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


class _Meta(BaseModel):
    """A work folder's ``meta.json``: the key its results are valid for."""

    model_config = ConfigDict(extra="allow", strict=True)
    key_hash: str
    key: dict


class SharedCache:
    """Content-keyed results reused across run directories: ``<dir>/<key_hash>/``.

    Rows are found by the hash of their prompt's inputs, not by id or set, so any audit that
    evaluates the same model with the same settings on the same prompt text reuses them. Writers
    append under a per-entry lock; readers skip lines that are not rows.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def _entry(self, key_hash: str) -> Path:
        return self.root / key_hash

    def rows(self, key_hash: str) -> dict[str, dict]:
        path = self._entry(key_hash) / "rows.jsonl"
        found = {}
        if path.is_file():
            for line in path.read_bytes().splitlines():
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if isinstance(row, dict) and isinstance(row.get("input_sha"), str):
                    found[row["input_sha"]] = row
        return found

    def add_rows(self, key_hash: str, rows: list[dict]) -> None:
        from filelock import FileLock

        entry = self._entry(key_hash)
        entry.mkdir(parents=True, exist_ok=True)
        with FileLock(str(entry / LOCK_FILE)):
            _append_rows(entry / "rows.jsonl", [r for r in rows if isinstance(r.get("input_sha"), str)])

    def get(self, key_hash: str, name: str):
        return _read_json(self._entry(key_hash) / f"{name}.json")

    def put(self, key_hash: str, name: str, value) -> None:
        atomic_write_json(self._entry(key_hash) / f"{name}.json", value)


class VariantWork:
    """Resumable per-prompt results of one variant, valid only for one cache key."""

    def __init__(self, root: Path, key: dict, shared: SharedCache | None = None):
        self.root = root
        self.key = key
        self.key_hash = stable_hash(key)
        self.shared = shared
        meta = root / "meta.json"
        if root.exists():
            if not (root / WORK_MARKER).is_file():
                raise UserError(f"{root} exists but was not made by safequant (no {WORK_MARKER}): move it away or "
                                "choose another --out")
            cached = _load_meta(meta)
            if cached is None or cached.key_hash != self.key_hash:
                # Settings changed, or meta.json is unreadable: nothing cached here applies any more.
                shutil.rmtree(root)
        if not root.exists():
            root.mkdir(parents=True)
            atomic_write(root / WORK_MARKER, "work folder of a safequant run directory\n")
            atomic_write_json(meta, {"key_hash": self.key_hash, "key": key})

    def rows(self, set_name: str) -> list[dict]:
        return _read_rows(self.root / f"{set_name}.jsonl")

    def shared_rows(self) -> dict[str, dict]:
        """Rows of the shared cache for this key, by their ``input_sha`` ({} without a cache)."""
        return self.shared.rows(self.key_hash) if self.shared else {}

    def append_rows(self, set_name: str, rows: Iterable[dict], share: bool = True) -> None:
        rows = list(rows)
        _append_rows(self.root / f"{set_name}.jsonl", rows)
        if self.shared and share:
            self.shared.add_rows(self.key_hash, rows)

    def get(self, name: str):
        value = _read_json(self.root / f"{name}.json")
        if value is None and self.shared:
            value = self.shared.get(self.key_hash, name)
        return value

    def put(self, name: str, value) -> None:
        atomic_write_json(self.root / f"{name}.json", value)
        if self.shared:
            self.shared.put(self.key_hash, name, value)


def _load_meta(path: Path) -> _Meta | None:
    """The work folder's meta.json against its schema; None when missing, corrupt or mistyped."""
    try:
        return _Meta.model_validate(_read_json(path))
    except ValidationError:
        return None


class RunStore:
    """One audit's run directory (and, optionally, the cache shared by all run directories)."""

    def __init__(self, run_dir: Path, cache_dir: Path | None = None):
        self.run_dir = Path(run_dir)
        self.shared = SharedCache(cache_dir) if cache_dir else None

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run directory's lock; a second process gets one clear error line at once.

        Temporary files left by a killed run are removed once the lock is held (no live writer
        can own one then).
        """
        from filelock import FileLock, Timeout

        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.run_dir / LOCK_FILE), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise UserError(f"run directory {str(self.run_dir)!r} is in use by another safequant process "
                            f"(lock {self.run_dir / LOCK_FILE}): wait for it to finish or choose another --out") from None
        try:
            for tmp in remove_orphaned_temps(self.run_dir):
                log.info("removed %s, left by an interrupted run", tmp)
            yield
        finally:
            lock.release()

    def variant_work(self, variant_name: str, key: dict) -> VariantWork:
        return VariantWork(self.run_dir / "work" / work_folder_name(variant_name), key, self.shared)

    def write_results(self, summary: dict, rows: list[dict]) -> None:
        """Rows first, then the summary: a summary on disk always has its rows beside it."""
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        atomic_write_text(self.run_dir / "rows.jsonl", lines)
        atomic_write_json(self.run_dir / "summary.json", summary)
