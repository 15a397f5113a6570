"""Shared fixtures: the tiny text-to-image model of ``tiny_models`` (its config and checkpoint written to
a temporary folder once per test session) and the scripts under ``scripts/``."""
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tiny_models import TINY_CONFIG, build_tiny_model, tiny_config, write_config


@dataclass
class TinyFiles:
    dir: Path
    config: Path
    ckpt: Path                # Lightning-style {"state_dict": ...}
    safetensors: Path
    state_dict: dict


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    from safetensors.torch import save_file
    folder = tmp_path_factory.mktemp("tiny_ldm")
    model = build_tiny_model()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    config = write_config(TINY_CONFIG, folder / "tiny-ldm.yaml")
    torch.save({"state_dict": sd, "global_step": 0, "epoch": 0}, folder / "tiny-ldm.ckpt")
    save_file(sd, folder / "tiny-ldm.safetensors")
    return TinyFiles(folder, config, folder / "tiny-ldm.ckpt", folder / "tiny-ldm.safetensors", sd)


@pytest.fixture(scope="session")
def tiny_model(tiny_files):
    """The tiny model loaded through the public loader, on the CPU (shared: do not modify)."""
    from ldm.checkpoint import load_model
    return load_model(tiny_files.config, tiny_files.ckpt, device="cpu")


@pytest.fixture(scope="session")
def tiny():
    """``tiny_models``' config, build and write_config helpers as one fixture."""
    return SimpleNamespace(config=tiny_config, build=build_tiny_model, write_config=write_config)


@pytest.fixture
def random_png(tmp_path):
    """``random_png(name, width, height)`` saves a seeded random RGB image as ``tmp_path / name``
    and returns its path."""
    def save(name, width, height, seed=0):
        import numpy as np
        from PIL import Image
        path = tmp_path / name
        Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8)).save(path)
        return path
    return save


REPO_ROOT = Path(__file__).resolve().parent.parent


def _load_script(name):
    import importlib.util
    path = REPO_ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_script(name, args, cwd):
    """Run ``scripts/<name>.py`` in a fresh interpreter, as a user would."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / f"{name}.py"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _model_flags(files):
    """The flags that make a script use the model in ``files`` (``.ckpt`` and ``.config``) on the CPU."""
    return ["--ckpt", str(files.ckpt), "--config", str(files.config), "--device", "cpu"]


@pytest.fixture(scope="session")
def scripts():
    """``scripts.load(name)`` imports a script module; ``scripts.run(name, args, cwd)`` runs it;
    ``scripts.model_flags(files)`` are the flags that select a test model."""
    return SimpleNamespace(load=_load_script, run=_run_script, model_flags=_model_flags)
