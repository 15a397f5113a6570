"""bench/load.py: a --smoke run end to end (fields of the JSON, not its numbers: those belong to the
benchmark), and an existing --out refused before any work."""
import json

import pytest


@pytest.fixture
def bench_load(load_bench):
    return load_bench("load")


def test_refuses_an_existing_out_before_writing_a_checkpoint(bench_load, tmp_path, capsys):
    committed = tmp_path / "load.json"
    committed.write_text("{}")
    assert bench_load.main(["--smoke", "--workdir", str(tmp_path / "work"), "--out", str(committed)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {committed} exists; pass --force to replace it, or leave out --out to write a new file"]
    assert not (tmp_path / "work").exists()


@pytest.mark.slow  # five fresh Python processes, each importing torch and the model code
def test_smoke_run_measures_every_way_and_keeps_a_given_workdir(bench_load, tmp_path, capsys):
    work = tmp_path / "work"
    args = ["--smoke", "--threads", "1", "--workdir", str(work)]
    assert bench_load.main(args) == 0
    (written,) = (tmp_path / "results").iterdir()
    report = json.loads(written.read_text())
    assert report["command"] == "python bench/load.py " + " ".join(args)
    assert report["smoke"] and report["config"] == "configs/stable-diffusion/v1-inference.yaml"
    assert {p.name for p in work.iterdir()} >= {"model.ckpt", "model.safetensors", "smoke-v1-inference.yaml"}
    assert report["files"]["ckpt"]["bytes"] == (work / "model.ckpt").stat().st_size
    rows = report["rows"]
    assert [(r["way"], r["file"]) for r in rows] == [("official", "ckpt"), ("ours", "ckpt"),
                                                     ("ours", "safetensors"), ("txt2img", "ckpt")]
    assert not any("error" in r for r in rows)
    assert all(r["peak_rss_gb"] > 0 and r["process_s"] > 0 and r["peak_over_file"] > 0 for r in rows)
    loads = rows[:3]
    assert all(r["load_s"] > 0 and r["rss_after_gb"] > 0 and r["threads"] == 1 for r in loads)
    assert len({r["check"] for r in loads}) == 1          # the three loads read the same weights
    assert "--H 64 --W 64 --steps 2 --n_samples 1" in rows[3]["command"]
    out = capsys.readouterr().out
    assert "| run | file | load s | process s |" in out and "| ours | .safetensors |" in out
