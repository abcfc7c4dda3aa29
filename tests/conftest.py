"""Shared fixtures: the bundled toy models (real weights, loaded once per session) and data paths."""

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

# Tests never share results through the user's cache (~/.cache/safequant): each audit computes its
# own, and the cache tests pass an explicit --cache-dir.
os.environ["SAFEQUANT_CACHE_DIR"] = "none"

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def load_bench(name: str) -> ModuleType:
    """``bench/<name>.py`` imported fresh (bench scripts are not a package); registered in
    ``sys.modules`` because dataclasses look their module up there."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def toy_chat():
    from harness.models import load_model

    return load_model("toy-chat", device="cpu")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core CPU: OpenMP threads fighting over the cores made training
    ~50x slower than one thread did; tests that train tiny models pin torch to one thread."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"third-party benchmark files not found at {SHARED_DATA}")
    return SHARED_DATA


def move_off_initial_values(block, seed: int = 0) -> None:
    """Move a ``QRealignBlock``'s learnable smoothing scales and clipping factors off their
    initial values (seeded), so a test compares a learned block, not plain RTN."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.scales.values():
            p.mul_(torch.exp(0.3 * torch.randn(p.shape, generator=g)))
        for m in block.linears.values():
            for p in m.clip_parameters():
                p.add_(torch.randn(p.shape, generator=g))
