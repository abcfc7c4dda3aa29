"""The import rules of docs/architecture.md, checked on the source of every module (ast, nothing is
imported): the packages form layers, and a lower one never imports a higher one, even lazily inside
a function. reports reads files only; probes and quantizers never reach into the harness.

    harness  ->  quantizers  ->  probes  ->  reports  ->  common

``common`` (the shared rules) imports none of the others; reports may use its torch-free modules only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Package -> the top-level modules it must never import (lazy imports inside functions count).
FORBIDDEN: dict[str, frozenset[str]] = {
    "reports": frozenset({"harness", "quantizers", "probes", "torch", "transformers", "sklearn",
                          "common.batching", "common.layout"}),
    "probes": frozenset({"harness", "quantizers"}),
    "quantizers": frozenset({"harness"}),
    "common": frozenset({"harness", "quantizers", "probes", "reports"}),
}


def imported_modules(source: str, module: str) -> set[str]:
    """Absolute names of every module ``source`` imports; ``module`` is its own dotted name, for
    relative imports (``from .base import x`` in ``quantizers.gptq`` is ``quantizers.base``)."""
    package = module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                found.add(".".join([*base, *([node.module] if node.module else [])]))
            else:
                found.add(node.module or "")
    return found


def violations(package: str, source: str, module: str) -> list[str]:
    """``module imports name`` for each import of ``source`` its package forbids."""
    banned = FORBIDDEN.get(package, frozenset())
    return sorted(f"{module} imports {name}" for name in imported_modules(source, module)
                  if name.split(".")[0] in banned or any(name == b or name.startswith(b + ".") for b in banned))


def _modules(package: str) -> list[tuple[str, Path]]:
    files = sorted((ROOT / package).rglob("*.py"))
    return [(".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"), f) for f in files]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_keeps_its_import_rules(package):
    modules = _modules(package)
    assert len(modules) >= 5, f"found only {len(modules)} modules under {package}/"
    found = [v for name, path in modules for v in violations(package, path.read_text(encoding="utf-8"), name)]
    assert found == [], "\n".join(found)


def test_the_check_catches_a_forbidden_import():
    """The rule check itself can fail: direct, lazy, dotted and relative forms are all seen."""
    source = ("import numpy\n"
              "from harness.models import load_model\n"
              "def lazy():\n"
              "    import torch.nn\n"
              "    from ..harness import quantize\n"
              "from .base import Quantizer\n")
    assert imported_modules(source, "quantizers.bad") == {"numpy", "harness.models", "torch.nn", "harness",
                                                           "quantizers.base"}
    assert violations("quantizers", source, "quantizers.bad") == ["quantizers.bad imports harness",
                                                                   "quantizers.bad imports harness.models"]
    assert violations("reports", source, "reports.bad") == ["reports.bad imports harness",
                                                            "reports.bad imports harness.models",
                                                            "reports.bad imports torch.nn"]  # .base: reports.base
    assert violations("harness", source, "harness.fine") == []
