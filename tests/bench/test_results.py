"""The benchmarks never replace a results file by accident: a plain run writes a new file under
bench/results/, and an existing ``--out`` needs ``--force`` (refused before any work is done).
bench/shapes_fidelity.py also runs end to end on the tiny model with its smallest settings."""
import hashlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"


@pytest.fixture
def bench(monkeypatch, tmp_path):
    """``bench.load(name)`` imports bench/<name>.py as ``python bench/<name>.py`` would (bench/ on
    sys.path); new results go to ``tmp_path / "results"`` instead of bench/results."""
    monkeypatch.syspath_prepend(str(BENCH))

    def load(name):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    results = importlib.import_module("_results")        # the module the scripts import
    monkeypatch.setattr(results, "RESULTS", tmp_path / "results")
    return type("Bench", (), {"load": staticmethod(load), "results": results})


@pytest.fixture
def committed(tmp_path):
    path = tmp_path / "committed.json"
    path.write_text('{"the": "committed numbers"}')
    return path


def test_new_results_path_is_dated_and_never_an_existing_file(bench, tmp_path):
    now = time.mktime((2026, 12, 2, 3, 4, 5, 0, 0, -1))
    first = bench.results.new_results_path("shapes_fidelity", tmp_path, now=now)
    assert first == tmp_path / "shapes_fidelity-20261202-030405.json"
    first.write_text("{}")
    second = bench.results.new_results_path("shapes_fidelity", tmp_path, now=now)
    assert second == tmp_path / "shapes_fidelity-20261202-030405-2.json"
    second.write_text("{}")
    assert bench.results.new_results_path("shapes_fidelity", tmp_path, now=now).name.endswith("-3.json")
    default = bench.results.new_results_path("unet_step")
    assert default.parent == tmp_path / "results" and default.name.startswith("unet_step-")


def test_results_path_needs_force_for_an_existing_file(bench, committed):
    with pytest.raises(FileExistsError, match="pass --force"):
        bench.results.results_path(str(committed), False, "x")
    assert bench.results.results_path(str(committed), True, "x") == committed
    assert bench.results.results_path(None, False, "x").parent.name == "results"


def test_shapes_fidelity_refuses_an_existing_out_before_loading_a_model(bench, committed, capsys):
    fidelity = bench.load("shapes_fidelity")
    assert fidelity.main(["--ckpt", "missing.ckpt", "--config", "missing.yaml", "--out", str(committed)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {committed} exists; pass --force to replace it, or leave out --out to write a new file"]
    assert committed.read_text() == '{"the": "committed numbers"}'


def test_shapes_fidelity_on_the_tiny_model_records_weights_and_command(bench, tiny_files, tmp_path, committed):
    fidelity = bench.load("shapes_fidelity")
    small = ["--ckpt", str(tiny_files.ckpt), "--config", str(tiny_files.config), "--prompts", "18",
             "--pair-prompts", "6", "--seeds", "0", "--steps", "1", "--batch", "18"]
    assert fidelity.main(small) == 0
    (written,) = (tmp_path / "results").iterdir()                  # a new file, not a committed one
    assert written.name.startswith("shapes_fidelity-")
    result = json.loads(written.read_text())
    assert result["command"] == "python bench/shapes_fidelity.py " + " ".join(small)
    assert result["model"]["ckpt_sha256"] == hashlib.sha256(tiny_files.ckpt.read_bytes()).hexdigest()
    assert result["model"]["config_sha256"] == hashlib.sha256(tiny_files.config.read_bytes()).hexdigest()
    assert result["model"]["config"] == str(tiny_files.config)    # outside the repo: absolute
    assert result["settings"]["images"] == 24 and result["overall"]["colour"]["n"] == 18
    assert result["scenes"]["overall"]["both shapes"]["n"] == 6 and result["scenes"]["overall"]["background"]["n"] == 3
    assert result["settings"]["sampler"] == "ddim" and result["settings"]["scale"] == 7.5   # not the shipped model
    assert fidelity.main([*small, "--out", str(committed), "--force"]) == 0
    assert json.loads(committed.read_text())["command"].endswith(f"--out {committed} --force")


def test_shapes_fidelity_names_files_in_the_repo_relative_to_it(bench):
    fidelity = bench.load("shapes_fidelity")
    assert fidelity.shown_path(REPO / "models" / "shapes" / "shapes-ldm.yaml") == "models/shapes/shapes-ldm.yaml"


def test_unet_step_refuses_an_existing_out(committed):
    """Run as a user would; without the check this smoke run would take seconds and overwrite the file."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(BENCH / "unet_step.py"), "--smoke", "--sizes", "8", "--repeats",
                             "1", "--warmup", "0", "--impls", "ours", "--dtypes", "fp32", "--out", str(committed)],
                            cwd=committed.parent, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"error: {committed} exists; pass --force to replace it, or leave out --out to write a new file"]
    assert committed.read_text() == '{"the": "committed numbers"}'


def test_shapes_defaults_picks_the_fewest_steps_within_tolerance(bench):
    defaults = bench.load("shapes_defaults")
    rows = [{"sampler": "DDIM", "steps": 10, "fidelity": 90.0}, {"sampler": "DDIM", "steps": 20, "fidelity": 96.0},
            {"sampler": "Euler", "steps": 15, "fidelity": 95.5}, {"sampler": "Euler", "steps": 30, "fidelity": 96.4}]
    assert defaults.pick(rows, 1.0) == rows[2]         # 15 steps at 95.5 is within a point of 96.4
    assert defaults.pick(rows, 0.5) == rows[1]
    assert defaults.pick(rows, 10.0) == rows[0]


def test_shapes_defaults_on_the_tiny_model_scores_every_run(bench, tiny_files, tmp_path):
    defaults = bench.load("shapes_defaults")
    out = tmp_path / "defaults.json"
    args = ["--ckpt", str(tiny_files.ckpt), "--config", str(tiny_files.config), "--samplers", "DDIM", "Euler",
            "--steps", "2", "1", "--prompts", "18", "--pair-prompts", "6", "--batch", "24", "--out", str(out)]
    assert defaults.main(args) == 0
    result = json.loads(out.read_text())
    assert [(r["sampler"], r["steps"]) for r in result["runs"]] == [("DDIM", 1), ("DDIM", 2), ("Euler", 1), ("Euler", 2)]
    for run in result["runs"]:
        assert run["settings"]["images"] == 24 and run["settings"]["steps"] == run["steps"]
        assert 0 <= run["worst"] <= run["fidelity"] <= 100
    assert result["pick"] == {k: defaults.pick(result["runs"], 1.0)[k] for k in ("sampler", "steps")}
    assert defaults.main(args) == 2                   # the file exists now: refused without --force


def test_controlnet_bench_refuses_an_existing_out_before_loading(bench, committed, capsys):
    assert bench.load("controlnet").main(["--control", "missing.safetensors", "--out", str(committed)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {committed} exists; pass --force")
    assert committed.read_text() == '{"the": "committed numbers"}'


def test_controlnet_bench_reads_the_region_and_the_position(bench):
    from ldm.data.shapes_control import ShapesControl, region_box
    controlnet = bench.load("controlnet")
    data = ShapesControl(length=8, free_fraction=0.0)
    for i in range(len(data)):
        attributes, (cx, cy, extent), image, _ = data.example(i)
        box = region_box(attributes["shape"], cx, cy, extent)
        _, correct = controlnet.read(image, box, attributes["position"], attributes["colour"], attributes["shape"])
        assert all(correct.values()), (attributes, correct)
        moved = (box[0] + 0.3, box[1], box[2] + 0.3, box[3]) if cx < 0.5 else (box[0] - 0.3, box[1], box[2] - 0.3, box[3])
        _, correct = controlnet.read(image, moved, None, attributes["colour"], attributes["shape"])
        assert not correct["inside"]
