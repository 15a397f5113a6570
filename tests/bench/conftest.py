"""What the bench tests share: a bench script imported as running it would import it."""
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def load_bench(monkeypatch, tmp_path):
    """``load_bench(name)``: bench/<name>.py imported as ``python bench/<name>.py`` would import it (bench/ on
    sys.path), writing new results under ``tmp_path / "results"``."""
    monkeypatch.syspath_prepend(str(BENCH))

    def load(name):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        monkeypatch.setattr(sys.modules["_results"], "RESULTS", tmp_path / "results")
        return module

    return load
