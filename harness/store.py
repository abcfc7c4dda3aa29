"""The run directory: atomic summary and row files, and resumable per-variant work.

Layout (docs/architecture.md): `summary.json` and `rows.jsonl` are rewritten atomically (temp file
+ rename) after each variant, so readers never see half a file. Work in progress lives in
`work/<variant>/`, keyed by a hash of everything that decides the result (model fingerprint,
variant, generation and judge settings); rows are appended per batch and flushed, so an
interrupted run resumes from the last finished batch, and a changed setting invalidates only the
work it affects.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from harness.errors import UserError

# One definition for the writer and every reader (reports.schema holds the migrations).
from reports.schema import SCHEMA_VERSION  # noqa: E402,F401


def stable_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; a torn last line (from an interrupted append) is dropped."""
    rows = []
    if not path.is_file():
        return rows
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
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


class VariantWork:
    """Resumable per-prompt results of one variant, valid only for one cache key."""

    def __init__(self, root: Path, key: dict):
        self.root = root
        self.key = key
        self.key_hash = stable_hash(key)
        meta = root / "meta.json"
        if meta.is_file() and json.loads(meta.read_text()).get("key_hash") != self.key_hash:
            shutil.rmtree(root)  # settings changed: nothing cached here applies any more
        root.mkdir(parents=True, exist_ok=True)
        if not meta.is_file():
            atomic_write_json(meta, {"key_hash": self.key_hash, "key": key})

    def rows(self, set_name: str) -> list[dict]:
        return read_jsonl(self.root / f"{set_name}.jsonl")

    def append_rows(self, set_name: str, rows: Iterable[dict]) -> None:
        path = self.root / f"{set_name}.jsonl"
        self._truncate_torn_tail(path)
        with path.open("a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    @staticmethod
    def _truncate_torn_tail(path: Path) -> None:
        if not path.is_file():
            return
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])

    def get(self, name: str):
        path = self.root / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def put(self, name: str, value) -> None:
        atomic_write_json(self.root / f"{name}.json", value)


class RunStore:
    """One audit's run directory."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def variant_work(self, variant_name: str, key: dict) -> VariantWork:
        return VariantWork(self.run_dir / "work" / variant_name, key)

    def write_results(self, summary: dict, rows: list[dict]) -> None:
        """Rows first, then the summary: a summary on disk always has its rows beside it."""
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        atomic_write_text(self.run_dir / "rows.jsonl", lines)
        atomic_write_json(self.run_dir / "summary.json", summary)
