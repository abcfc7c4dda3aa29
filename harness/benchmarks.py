"""Benchmark registry: named, versioned safety prompt sets loaded into :class:`harness.prompts.PromptSet`.

Modelled on lm-evaluation-harness's task registry: every benchmark is a declarative
:class:`BenchmarkSpec` (where the data lives, which columns hold what, which rows belong, what role
the set plays), registered by name with :func:`register_benchmark`; *groups* (:func:`register_group`)
expand one name into several sets, as ``xstest`` -> ``xstest-safe`` + ``xstest-unsafe``. The
built-in entries are data: ``harness/data/benchmarks/*.toml``, read at import by the same reader
as a user's definition file (:func:`benchmark_from_file`); a user-defined file with a column
mapping (:func:`define_benchmark`) is then indistinguishable from a built-in entry. The
``--prompt-sets`` grammar has one parser (:func:`parse_set_spec`), and rows become records by the
one builder of :mod:`harness.prompt_files`.

Where the rows come from, first match wins:

1. an explicit source: ``NAME=PATH`` on the command line (``source=`` here): a CSV, JSONL or parquet
   file, a folder written by ``datasets.Dataset.save_to_disk`` (``load_from_disk``), a folder that
   holds the upstream file under its upstream name, or ``hf:ORG/DATASET[:CONFIG][@SPLIT]``;
2. a data folder (``data_dir=`` or ``$SAFEQUANT_DATA_DIR``, ``os.pathsep``-separated) holding the
   upstream file under its upstream name;
3. the Hugging Face Hub through ``datasets.load_dataset`` (needs network; without it the error says
   to pass ``NAME=PATH``).

A file whose sha256 is not the upstream original's is loaded with a warning (results may not be
comparable to published numbers); the digest and the verdict travel with the set
(:class:`BenchmarkSet`) so the audit can record them in ``summary.json``.

The sets returned are :class:`BenchmarkSet` objects: a :class:`~harness.prompts.PromptSet`
subclass with extra, defaulted fields, so everything that consumes a ``PromptSet`` works unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.prompt_files import SUPPORTED_EXTENSIONS, RowRules, build_records, read_rows
from harness.prompts import BUILTIN_SETS, ROLES, PromptRecord, PromptSet, load_prompt_set, split_role
from harness.set_limits import SetLimits

__all__ = [
    "BENCHMARKS",
    "GROUPS",
    "DATA_DIR_ENV",
    "BenchmarkRecord",
    "BenchmarkSet",
    "BenchmarkSpec",
    "HubSource",
    "benchmark_from_file",
    "define_benchmark",
    "expand",
    "get_benchmark",
    "list_benchmarks",
    "load_benchmark",
    "load_benchmarks",
    "parse_set_spec",
    "read_definitions",
    "register_benchmark",
    "register_group",
    "sha256_file",
    "verify_file",
    "KNOWN_SHA256",
    "describe_sets",
]

log = logging.getLogger(__name__)

DATA_DIR_ENV = "SAFEQUANT_DATA_DIR"
#: The built-in benchmark entries: one TOML file per family, read by :func:`benchmark_from_file`.
BENCHMARK_DIR = Path(__file__).resolve().parent / "data" / "benchmarks"
#: Record fields a benchmark column mapping may target (``context`` and ``target`` are extra).
SPEC_FIELDS: tuple[str, ...] = ("prompt", "id", "category", "label", "context", "target")
#: How HarmBench puts a contextual behaviour's context in front of it
#: (baselines/direct_request: ``f"{context_str}\n\n---\n\n{behavior}"``).
HARMBENCH_CONTEXT_TEMPLATE = "{context}\n\n---\n\n{prompt}"


# ---------------------------------------------------------------------------------------------
# types


@dataclass(frozen=True, slots=True)
class BenchmarkRecord(PromptRecord):
    """A :class:`PromptRecord` that keeps the parts the prompt was built from.

    ``behavior`` is the request alone (HarmBench's classifier judges against it, without the
    context); ``context`` the context string that was prepended (empty if none); ``target`` the
    affirmative target string of AdvBench/JailbreakBench (GCG-style attacks use it).
    """

    behavior: str = ""
    context: str = ""
    target: str = ""


@dataclass(frozen=True, slots=True)
class BenchmarkSet(PromptSet):
    """A :class:`PromptSet` with provenance: which registry entry, which file, whether verified."""

    benchmark: str = ""
    sha256: str | None = None
    #: True: the file is the upstream original; False: it is not (warned); None: nothing to check.
    verified: bool | None = None
    hub_id: str | None = None
    #: Rows of the source left out by the entry's row filter (e.g. XSTest's other label).
    n_filtered: int = 0

    def describe(self) -> dict:
        """The ``summary.json`` ``prompt_sets`` entry for this set."""
        return {
            "role": self.role,
            "n": len(self.records),
            "source": self.source,
            "benchmark": self.benchmark or None,
            "sha256": self.sha256,
            "verified": self.verified,
            "hub_id": self.hub_id,
            "categories": self.categories,
        }


@dataclass(frozen=True)
class HubSource:
    """Where ``datasets.load_dataset`` finds a benchmark: a dataset id (or the ``csv`` builder with
    ``data_files``), an optional config name, a split, an optional revision."""

    path: str
    name: str | None = None
    split: str = "train"
    data_files: str | None = None
    revision: str | None = None

    def describe(self) -> str:
        if self.data_files:
            return f"{self.path}:{self.data_files}"
        out = self.path + (f":{self.name}" if self.name else "")
        return out + f"@{self.split}"


@dataclass(frozen=True)
class BenchmarkSpec:
    """A declarative benchmark entry (the analogue of an lm-evaluation-harness task config).

    ``columns`` maps a record field (``prompt``, ``id``, ``category``, ``label``, ``context``,
    ``target``) to the column(s) that hold it; a tuple lists alternatives tried in order, so the
    upstream file and a Hub mirror with other column names both load. ``where`` keeps rows whose
    column value is one of the listed values (applied only when the column exists). ``label``
    fixes every record's label; otherwise it comes from the ``label`` column (safe/unsafe and
    benign/harmful are understood), else from the role.
    """

    name: str
    role: str
    description: str = ""
    columns: Mapping[str, str | tuple[str, ...]] = field(default_factory=lambda: {"prompt": "prompt"})
    files: tuple[str, ...] = ()
    sha256: Mapping[str, str] = field(default_factory=dict)
    hub: HubSource | None = None
    hf_mirror: str | None = None
    label: str | None = None
    where: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    context_template: str = HARMBENCH_CONTEXT_TEMPLATE
    category_aliases: Mapping[str, str] = field(default_factory=dict)
    #: Split to pick from a saved ``DatasetDict`` folder (defaults to ``hub.split``).
    split: str | None = None
    #: Optional extra rows filter on by ``NAME+OPTION`` (e.g. ``harmbench+copyright``).
    options: Mapping[str, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)
    url: str = ""
    license: str = ""
    citation: str = ""
    builtin: bool = False
    #: A user-defined entry's own file (relative paths resolved against the definition file).
    path: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise UserError(f"benchmark {self.name!r}: role {self.role!r} is not one of {', '.join(ROLES)}")
        if self.label is not None and self.label not in ("harmful", "benign"):
            raise UserError(f"benchmark {self.name!r}: label must be harmful or benign, got {self.label!r}")
        unknown = [k for k in self.columns if k not in SPEC_FIELDS]
        if unknown:
            raise UserError(
                f"benchmark {self.name!r}: column mapping key(s) {unknown} are not fields; map one of "
                f"{', '.join(SPEC_FIELDS)} (e.g. prompt=goal)"
            )
        if "prompt" not in self.columns and not self.builtin:
            raise UserError(f"benchmark {self.name!r}: the column mapping must say which column holds the prompt")

    @property
    def hub_id(self) -> str | None:
        return self.hub.describe() if self.hub else None

    def candidates(self, fld: str) -> tuple[str, ...]:
        return self.rules().candidates(fld)

    def rules(self, where: Mapping[str, tuple[str, ...]] | None = None) -> RowRules:
        """How this entry's rows become records (``where``: the row filter with options applied)."""
        return RowRules(
            columns={f: (c,) if isinstance(c, str) else tuple(c) for f, c in self.columns.items()},
            required=tuple(f for f in self.columns if f in ("id", "label")), role=self.role, label=self.label,
            where=dict(self.where if where is None else where), context_template=self.context_template,
            category_aliases=self.category_aliases,
        )


# ---------------------------------------------------------------------------------------------
# registry

BENCHMARKS: dict[str, BenchmarkSpec] = {}
GROUPS: dict[str, tuple[str, ...]] = {}


def register_benchmark(spec: BenchmarkSpec, *, overwrite: bool = False) -> BenchmarkSpec:
    """Add ``spec`` to the registry under ``spec.name`` (an existing name needs ``overwrite``)."""
    if not overwrite and (spec.name in BENCHMARKS or spec.name in GROUPS):
        raise UserError(f"benchmark {spec.name!r} is already registered; pick another name")
    BENCHMARKS[spec.name] = spec
    return spec


def register_group(name: str, members: Sequence[str], *, overwrite: bool = False) -> None:
    """Make ``name`` expand to several registered benchmarks (as lm-eval's groups do)."""
    if not overwrite and (name in BENCHMARKS or name in GROUPS):
        raise UserError(f"benchmark group {name!r} is already registered; pick another name")
    missing = [m for m in members if m not in BENCHMARKS]
    if missing:
        raise UserError(f"benchmark group {name!r}: unknown member(s) {missing}")
    GROUPS[name] = tuple(members)


def expand(name: str) -> list[str]:
    """A group's member names, or ``[name]`` for a single benchmark."""
    base = name.split("+", 1)[0]
    if base in GROUPS:
        suffix = name[len(base):]
        return [m + suffix for m in GROUPS[base]]
    return [name]


def get_benchmark(name: str) -> BenchmarkSpec:
    base = name.split("+", 1)[0]
    try:
        return BENCHMARKS[base]
    except KeyError:
        raise UserError(f"unknown benchmark {name!r}: choose one of {_known()}") from None


def list_benchmarks() -> list[dict]:
    """One row per registered benchmark and group, for ``safequant benchmarks``."""
    out = []
    for spec in BENCHMARKS.values():
        out.append({"name": spec.name, "role": spec.role, "description": spec.description,
                    "hub": spec.hub_id, "files": list(spec.files), "builtin": spec.builtin,
                    "options": sorted(spec.options)})
    for name, members in GROUPS.items():
        out.append({"name": name, "role": "group", "description": "group: " + ", ".join(members),
                    "hub": None, "files": [], "builtin": False, "options": []})
    return out


def _known() -> str:
    return ", ".join([*BENCHMARKS, *GROUPS])


# ---------------------------------------------------------------------------------------------
# the built-in entries


def _register_builtins() -> None:
    """The harness's own prompt sets, then every entry of ``harness/data/benchmarks/*.toml``."""
    for name, (_file, role) in BUILTIN_SETS.items():
        register_benchmark(BenchmarkSpec(name=name, role=role, builtin=True, columns={},
                                         description=f"built-in {name} set (harness/data/prompts)"), overwrite=True)
    for file in sorted(BENCHMARK_DIR.glob("*.toml")):
        read_definitions(file)


#: sha256 of upstream originals by file name: every registered entry's, plus the perplexity text
#: the project reads from the same data folder (WikiText-2 raw test).
WIKITEXT2_TEST = "wikitext2_test.raw"
KNOWN_SHA256: dict[str, str] = {WIKITEXT2_TEST: "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"}


def verify_file(path: str | os.PathLike) -> tuple[str, bool | None]:
    """``(sha256, verdict)`` for a data file: True/False against :data:`KNOWN_SHA256` by file name
    (logging a warning on a mismatch), None when its name is not known."""
    p = Path(path)
    digest = sha256_file(p)
    expected = KNOWN_SHA256.get(p.name)
    if expected is None:
        return digest, None
    if digest != expected:
        log.warning("%s has sha256 %s, not the upstream original's %s; it may be an edited copy",
                    p, digest[:16] + "...", expected[:16] + "...")
        return digest, False
    return digest, True


# ---------------------------------------------------------------------------------------------
# user-defined entries


def define_benchmark(
    name: str,
    path: str | os.PathLike,
    *,
    role: str,
    columns: Mapping[str, str | Sequence[str]] | None = None,
    label: str | None = None,
    where: Mapping[str, Sequence[str]] | None = None,
    description: str = "",
    sha256: str | None = None,
    register: bool = True,
    overwrite: bool = False,
) -> BenchmarkSpec:
    """Make a prompt file a first-class benchmark: ``define_benchmark("mine", "p.csv", role="harmful",
    columns={"prompt": "goal", "category": "type"})``. ``sha256`` pins the file's digest."""
    if not name or "=" in name or "+" in name:
        raise UserError(f"benchmark name {name!r} must be non-empty and contain neither '=' nor '+'")
    cols = {k: (v if isinstance(v, str) else tuple(v)) for k, v in (columns or {"prompt": "prompt"}).items()}
    if "prompt" not in cols:
        cols["prompt"] = "prompt"
    file = Path(path).expanduser()
    spec = BenchmarkSpec(
        name=name, role=role, columns=cols, label=label,
        where={k: tuple(str(x) for x in v) for k, v in (where or {}).items()},
        description=description or f"user benchmark from {file.name}",
        files=(file.name,), sha256={file.name: sha256.lower()} if sha256 else {}, path=str(file),
    )
    if register:
        register_benchmark(spec, overwrite=overwrite)
    return spec


def benchmark_from_file(path: str | os.PathLike, *, register: bool = True, overwrite: bool = True) -> BenchmarkSpec:
    """Read a benchmark definition (TOML or JSON), the analogue of an lm-eval task YAML; returns
    its (first) entry. A user's definition names its own file::

        [benchmark]
        name = "my-harmful"
        role = "harmful"                      # harmful | benign | overrefusal
        path = "prompts.csv"                  # relative to this file
        description = "..."
        sha256 = "..."                        # optional: warn when the file changes
        label = "harmful"                     # optional: fixed label (else the label column/role)
        [benchmark.columns]
        prompt = "goal"
        category = "type"
        [benchmark.where]
        label = ["unsafe"]

    The built-in entries (``harness/data/benchmarks/*.toml``) use the same reader with the other
    :class:`BenchmarkSpec` fields instead of ``path``: ``files`` (upstream file names looked up in
    the data folders), ``sha256`` as a table by file name, ``hub`` (a :class:`HubSource` table),
    ``options``, ``category_aliases``, ``split``, ``hf_mirror``, ``url``, ``license``,
    ``citation``. A file may hold several entries (``[[benchmark]]``), keys they share
    (``[defaults]``) and groups (``[groups]``, name = members).
    """
    return read_definitions(path, register=register, overwrite=overwrite)[0]


#: Keys of a definition: every BenchmarkSpec field but ``builtin``.
_DEFINITION_KEYS = frozenset(f.name for f in dataclasses.fields(BenchmarkSpec)) - {"builtin"}


def read_definitions(path: str | os.PathLike, *, register: bool = True, overwrite: bool = True) -> list[BenchmarkSpec]:
    """Every entry of a definition file (see :func:`benchmark_from_file`), registered with its groups."""
    file = Path(path).expanduser()
    display = f"benchmark definition {path}"
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{display}: cannot read ({e.strerror or e}); check the path") from None
    try:
        data = json.loads(text) if file.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"{display}: not valid {file.suffix.lstrip('.').upper()} ({e}); fix the syntax") from None
    defaults = data.get("defaults", {})
    entries = data.get("benchmark", data if not {"defaults", "groups"} & set(data) else [])
    entries = [entries] if isinstance(entries, Mapping) else list(entries)
    if not entries or not all(isinstance(e, Mapping) for e in [defaults, *entries]):
        raise UserError(f"{display}: no [benchmark] table; a definition needs name, role and path")
    specs = [_spec_from_definition({**defaults, **entry}, file, display, register, overwrite) for entry in entries]
    groups = data.get("groups", {})
    if not isinstance(groups, Mapping):
        raise UserError(f"{display}: [groups] must map a group name to its member names")
    for name, members in groups.items():
        if register:
            register_group(name, members, overwrite=overwrite)
    return specs


def _spec_from_definition(data: Mapping[str, Any], file: Path, display: str, register: bool,
                          overwrite: bool) -> BenchmarkSpec:
    unknown = sorted(set(data) - _DEFINITION_KEYS)
    if unknown:
        raise UserError(f"{display}: unknown keys {unknown}; valid keys are {sorted(_DEFINITION_KEYS)}")
    needs = ("name", "role") + (() if data.get("files") else ("path",))
    for key in needs:
        if not isinstance(data.get(key), str) or not data[key]:
            raise UserError(f"{display}: missing {key!r}; a definition needs name, role and path")
    if data.get("path"):  # a user's own file
        target = Path(data["path"]).expanduser()
        if not target.is_absolute():
            target = file.resolve().parent / target
        return define_benchmark(data["name"], target, role=data["role"], columns=data.get("columns"),
                                label=data.get("label"), where=data.get("where"),
                                description=data.get("description", ""), sha256=data.get("sha256"),
                                register=register, overwrite=overwrite)
    fields = dict(data)
    try:
        fields["hub"] = HubSource(**fields["hub"]) if "hub" in fields else None
    except TypeError as e:
        raise UserError(f"{display}: hub of {data['name']!r}: {e}; keys are path, name, split, data_files, revision") from None
    fields["files"] = tuple(fields.get("files", ()))
    fields["columns"] = {k: v if isinstance(v, str) else tuple(v) for k, v in fields.get("columns", {}).items()}
    fields["where"] = _value_lists(fields.get("where", {}))
    fields["options"] = {o: _value_lists(w) for o, w in fields.get("options", {}).items()}
    spec = BenchmarkSpec(**fields)
    if register:
        register_benchmark(spec, overwrite=overwrite)
        KNOWN_SHA256.update(spec.sha256)
    return spec


def _value_lists(where: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """A row filter as read from a definition: column -> the accepted values, as strings."""
    return {k: tuple(str(x) for x in v) for k, v in where.items()}


_register_builtins()


# ---------------------------------------------------------------------------------------------
# loading


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _data_dirs(data_dir: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    """The folders to search; a given --data-dir that is not a folder is an error, never a silent
    fall-back to the hub."""
    dirs: list[Path] = []
    if data_dir is not None:
        items = [data_dir] if isinstance(data_dir, (str, os.PathLike)) else list(data_dir)
        dirs.extend(Path(d).expanduser() for d in items)
        missing = [str(d) for d in dirs if not d.is_dir()]
        if missing:
            raise UserError(f"--data-dir {missing[0]!r} is not a folder: pass the folder holding the benchmark "
                            "files (e.g. ../shared/data)")
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        dirs.extend(Path(p).expanduser() for p in env.split(os.pathsep) if p)
    return dirs


def find_data_file(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """``name`` in the first data folder (``data_dir``, then ``$SAFEQUANT_DATA_DIR``) that holds it."""
    return next((d / name for d in _data_dirs(data_dir) if (d / name).is_file()), None)


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _find_file(spec: BenchmarkSpec, folders: Iterable[Path]) -> Path | None:
    for folder in folders:
        for name in spec.files:
            candidate = folder / name
            if candidate.is_file():
                return candidate
    return None


def _rows_from_saved(folder: Path, spec: BenchmarkSpec, display: str) -> tuple[list[dict[str, Any]], str]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise UserError(f"{display}: reading a datasets folder needs `pip install datasets`") from None
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:  # datasets raises several types for a bad folder
        raise UserError(f"{display}: not a readable datasets folder ({_first_line(e)}); "
                        f"write it with Dataset.save_to_disk or pass a file") from None
    where = str(folder.resolve())
    if isinstance(ds, datasets.DatasetDict):
        wanted = spec.split or (spec.hub.split if spec.hub else None)
        splits = list(ds.keys())
        if wanted in ds:
            ds, where = ds[wanted], f"{where}[{wanted}]"
        elif len(splits) == 1:
            ds, where = ds[splits[0]], f"{where}[{splits[0]}]"
        else:
            raise UserError(f"{display}: the datasets folder has splits {splits} and none is "
                            f"{wanted!r}; save the split you want on its own")
    return ds.to_list(), where


def _rows_from_hub(hub: HubSource, spec: BenchmarkSpec, display: str) -> list[dict[str, Any]]:
    hint = (f"download it and pass {spec.name}=PATH"
            + (f" (upstream file name: {spec.files[0]})" if spec.files else "")
            + f", or put it in a folder named by --data-dir / ${DATA_DIR_ENV}")
    try:
        import datasets
    except ImportError:  # pragma: no cover
        raise UserError(f"{display}: loading from the Hub needs `pip install datasets`; or {hint}") from None
    kwargs: dict[str, Any] = {"split": hub.split}
    if hub.data_files:
        kwargs["data_files"] = hub.data_files
    if hub.revision:
        kwargs["revision"] = hub.revision
    try:
        ds = datasets.load_dataset(hub.path, hub.name, **kwargs) if hub.name else datasets.load_dataset(hub.path, **kwargs)
    except ImportError as e:  # fsspec's HTTP filesystem (aiohttp) for data_files URLs
        raise UserError(f"{display}: cannot fetch {hub.describe()} ({_first_line(e)}); {hint}") from None
    except Exception as e:  # ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
        raise UserError(f"{display}: cannot load {hub.describe()} from the Hugging Face Hub "
                        f"({type(e).__name__}: {_first_line(e)}); {hint}") from None
    return ds.to_list()


def _parse_hub(text: str) -> HubSource:
    """``hf:ORG/NAME[:CONFIG][@SPLIT]`` -> HubSource."""
    body = text[3:]
    split = "train"
    if "@" in body:
        body, split = body.rsplit("@", 1)
    name = None
    if ":" in body:
        body, name = body.split(":", 1)
    if not body or "/" not in body:
        raise UserError(f"hub source {text!r} must look like hf:ORG/DATASET[:CONFIG][@SPLIT]")
    return HubSource(body, name or None, split or "train")


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:200]


def load_benchmark(
    name: str,
    source: str | os.PathLike | None = None,
    *,
    data_dir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    limit: int | None = None,
    verify: bool = True,
    include_copyright: bool = False,
) -> BenchmarkSet:
    """Load one registered benchmark (not a group: see :func:`load_benchmarks`).

    ``name`` may carry options after ``+`` (``harmbench+copyright``). ``source`` overrides where
    the rows come from (see the module docstring). ``limit`` keeps the first N records.
    """
    base, _, opts = name.partition("+")
    if base in GROUPS:
        raise UserError(f"{name!r} is a group of {', '.join(GROUPS[base])}; load it with load_benchmarks")
    spec = get_benchmark(base)
    options = [o for o in opts.split("+") if o]
    if include_copyright and "copyright" not in options:
        options.append("copyright")
    bad = [o for o in options if o not in spec.options]
    if bad:
        raise UserError(f"benchmark {base!r} has no option {bad[0]!r}"
                        + (f"; options: {', '.join(spec.options)}" if spec.options else ""))
    where = dict(spec.where)
    for o in options:
        where.update(spec.options[o])
    display = f"benchmark {name!r}"
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"{display}: limit must be a positive integer, got {limit!r}")

    if spec.builtin and source is None:
        ps = load_prompt_set(base, limit=limit)
        return BenchmarkSet(ps.name, ps.role, ps.source, ps.records, benchmark=base)

    rows: list[dict[str, Any]]
    digest: str | None = None
    hub_id: str | None = None
    file: Path | None = None
    src = os.fspath(source) if source is not None else (spec.path if spec.path else None)
    if src is not None and str(src).startswith("hf:"):
        hub = _parse_hub(str(src))
        rows, where_from, hub_id = _rows_from_hub(hub, spec, display), f"hub:{hub.describe()}", hub.describe()
    elif src is not None:
        p = Path(src).expanduser()
        if p.is_dir():
            if _is_saved_dataset(p):
                rows, where_from = _rows_from_saved(p, spec, display)
            else:
                file = _find_file(spec, [p])
                if file is None:
                    raise UserError(f"{display}: folder {src} has none of the upstream files "
                                    f"({', '.join(spec.files) or 'none known'}) and is not a datasets "
                                    f"folder; pass the file itself")
        elif p.is_file():
            file = p
        else:
            raise UserError(f"{display}: source {src} not found; pass an existing file or folder "
                            f"({spec.name}=PATH) or hf:ORG/DATASET")
    else:
        file = _find_file(spec, _data_dirs(data_dir))
        if file is None:
            if spec.hub is None:
                raise UserError(f"{display}: no data found and no Hub source known; pass {spec.name}=PATH")
            log.info("%s: no local copy found; loading %s through datasets", display, spec.hub.describe())
            rows = _rows_from_hub(spec.hub, spec, display)
            where_from, hub_id = f"hub:{spec.hub.describe()}", spec.hub.describe()
    verified: bool | None = None
    where_rows: list[str] | None = None
    if file is not None:
        rows, where_rows = read_rows(file, f"{display} file {file}")
        where_from = str(file.resolve())
        digest = sha256_file(file)
        if verify and spec.sha256:
            verified = digest in spec.sha256.values()
            if not verified:
                expected = spec.sha256.get(file.name) or next(iter(spec.sha256.values()))
                log.warning("%s: %s has sha256 %s, not the upstream original's %s; it may be an edited "
                            "copy, so results may not be comparable to published numbers",
                            display, file, digest[:16] + "...", expected[:16] + "...")
    if where_rows is None:  # a dataset: rows by number
        where_rows = [f"row {i}" for i in range(1, len(rows) + 1)]
    built = build_records(rows, where_rows, spec.rules(where), name=name, display=display)
    pset = BenchmarkSet(name=name, role=spec.role, source=where_from,
                        records=tuple(BenchmarkRecord(**r) for r in built.records), benchmark=spec.name,
                        sha256=digest, verified=verified, hub_id=hub_id, n_filtered=built.n_filtered)
    if limit is not None and limit < len(pset.records):
        pset = dataclasses.replace(pset, records=pset.records[:limit])
    return pset


@dataclass(frozen=True)
class SetRequest:
    """One ``--prompt-sets`` item as :func:`parse_set_spec` reads it.

    ``kind``: ``definition`` (a TOML/JSON definition file at ``source``), ``benchmark`` (the
    registered benchmark or group ``name``, ``+OPTION`` allowed, rows from ``source`` if given),
    ``mapped`` (a user file ``source`` named ``name`` with a column mapping from ``columns``),
    ``file`` (a plain prompt file or built-in set ``source``, named ``name`` if given, with ``role``
    if given).
    """

    kind: str
    text: str
    name: str | None = None
    source: str | None = None
    role: str | None = None


def parse_set_spec(text: str, columns: Mapping[str, Mapping[str, str]] | None = None) -> SetRequest:
    """The one reading of the ``--prompt-sets`` grammar, in the order the forms are tried:

    * ``def.toml`` / ``def.json``: a benchmark definition file (see :func:`benchmark_from_file`);
    * ``NAME=SOURCE`` with NAME a registered benchmark or group: that entry, rows from SOURCE
      (a group's members each pick their own upstream file from a folder SOURCE);
    * ``ROLE=PATH`` (harmful/benign/overrefusal): a plain prompt file with that role;
    * ``NAME=PATH`` with NAME in ``columns``: a user file with that column mapping;
    * ``NAME=PATH`` / ``NAME=ROLE=PATH`` with an unregistered NAME: a user file named NAME, role
      from its label column or ROLE;
    * ``NAME`` (``+OPTION`` allowed): a registered benchmark or group;
    * ``PATH``: a plain prompt file.
    """
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"benchmark {text!r} is empty; pass a name ({_known()}) or NAME=PATH")
    text = text.strip()
    path = Path(text).expanduser()
    if path.suffix.lower() in (".toml", ".json") and path.is_file():
        return SetRequest("definition", text, source=text)
    if "=" in text and not path.exists():
        name, _, src = (s.strip() for s in text.partition("="))
        if not src:
            raise UserError(f"benchmark {text!r}: nothing after '='; write {name}=PATH")
        base = name.split("+", 1)[0]
        if base in GROUPS or (base in BENCHMARKS and not BENCHMARKS[base].builtin):
            return SetRequest("benchmark", text, name=name, source=src)
        if name in ROLES:
            role, target = split_role(text)
            return SetRequest("file", text, source=target, role=role)
        if name in (columns or {}):
            return SetRequest("mapped", text, name=name, source=src)
        role, target = split_role(src)
        return SetRequest("file", text, name=name, source=target, role=role)
    base = text.split("+", 1)[0]
    if base in GROUPS or base in BENCHMARKS:
        return SetRequest("benchmark", text, name=text)
    if not path.exists() and path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise UserError(f"unknown prompt set {text!r}: not a benchmark ({_known()}) and no such file; "
                        f"pass a benchmark name, NAME=PATH or a {'/'.join(SUPPORTED_EXTENSIONS)} file")
    return SetRequest("file", text, source=text)


def load_benchmarks(
    specs: Sequence[str],
    *,
    data_dir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    limit: SetLimits | int | Mapping[str, int] | Sequence[str] | None = None,
    columns: Mapping[str, Mapping[str, str]] | None = None,
    verify: bool = True,
) -> list[PromptSet]:
    """Resolve the audit's ``--prompt-sets`` / ``--benchmark`` strings (the grammar of
    :func:`parse_set_spec`) into prompt sets.

    Returns the sets in order, groups expanded; set names are unique or a UserError says so.
    ``limit`` (any spelling :meth:`SetLimits.parse` reads: ``N``, ``{SET: N, "*": N}``) keeps the
    first N records of each set, applied once every set is loaded and named, so a ``SET=N``
    entry is checked against the names the run actually has.
    """
    limits = SetLimits.parse(limit)  # bad syntax fails before anything is read
    _data_dirs(data_dir)  # a missing --data-dir fails before anything is looked up
    out: list[PromptSet] = []
    columns = columns or {}
    for raw in specs:
        req = parse_set_spec(raw, columns)
        if req.kind == "definition":
            for spec in read_definitions(Path(req.source).expanduser()):
                out.append(load_benchmark(spec.name, data_dir=data_dir, verify=verify))
        elif req.kind == "benchmark":
            # rows from an explicit source, else from the data folders or the Hub
            for member in expand(req.name):
                out.append(load_benchmark(member, req.source, data_dir=None if req.source else data_dir,
                                          verify=verify))
        elif req.kind == "mapped":
            mapping = columns[req.name]
            spec = define_benchmark(req.name, req.source, role=mapping.get("role", "harmful"),
                                    columns={k: v for k, v in mapping.items() if k != "role"}, overwrite=True)
            out.append(load_benchmark(spec.name, verify=verify))
        else:
            ps = load_prompt_set(req.source, role=req.role)
            out.append(ps if req.name is None else BenchmarkSet(req.name, ps.role, ps.source, ps.records,
                                                                 benchmark=req.name))
    names = [ps.name for ps in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"prompt sets {dupes} are given twice; give each file a distinct NAME=PATH")
    return limits.apply(out)


def describe_sets(sets: Sequence[PromptSet]) -> dict[str, dict]:
    """``summary.json``'s ``prompt_sets`` block for any mix of PromptSet / BenchmarkSet."""
    out = {}
    for ps in sets:
        if isinstance(ps, BenchmarkSet):
            out[ps.name] = ps.describe()
        else:
            out[ps.name] = {"role": ps.role, "n": len(ps.records), "source": ps.source}
    return out


