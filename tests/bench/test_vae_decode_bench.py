"""bench/vae_decode.py: a --smoke run end to end on the tiny-width SD VAE (the fields of its JSON, not
its numbers: those belong to the benchmark), its workers run in this process except one."""
import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest


@pytest.fixture
def bench(load_bench):
    return load_bench("vae_decode")


def in_process(bench):
    """``spawn`` without the subprocess: the worker's JSON line read from its printed output."""
    def spawn(job, workdir, name):
        job = dict(job, output=str(Path(workdir) / f"{name}.pt"))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            bench.run_worker(json.loads(json.dumps(job)))
        return dict(json.loads(printed.getvalue().splitlines()[-1]), name=name, output=job["output"])
    return spawn


def test_smoke_run_writes_every_table(bench, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "spawn", in_process(bench))
    out = tmp_path / "vae.json"
    assert bench.main(["--smoke", "--threads", "1", "--repeats", "1", "--warmup", "0", "--impls", "ours",
                       "--levers", "fp32", "channels_last", "bf16_weights", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["speed"]] == ["ours-fp32", "ours-channels_last", "ours-bf16_weights"]
    layout = report["speed"][1]
    assert layout["max_abs_diff"] < 1e-3 and layout["vs"] == "ours-fp32"
    assert report["speed"][2]["path"] in ("fp32 fallback", "native bf16")
    names = [r["name"] for r in report["tiling"]]
    assert names == ["decode-64-auto-limit", "decode-128-untiled", "decode-128-tiled", "decode-128-tiled-preview-norms",
                     "decode-128-tiled-bf16-channels_last", "decode-64-untiled", "decode-64-tiled-32px",
                     "encode-128-untiled", "encode-128-tiled"]
    tiled, preview = report["tiling"][2:4]
    assert tiled["tiling"] == "64/32 image norms" and tiled["psnr_db"] > 0 and tiled["peak_rss_gb"] > 0
    assert preview["tiling"] == "64/32 preview norms" and preview["psnr_db"] > 0
    assert report["tiling"][-1]["rel_rmse"] >= 0
    assert all("output" not in r for r in report["speed"] + report["tiling"])
    printed = capsys.readouterr().out
    assert "x ours fp32" in printed and "decode-128-tiled" in printed


def test_a_worker_runs_in_its_own_process(bench, tmp_path):
    params = bench.vae_config(bench.DEFAULT_CONFIG, smoke=True)
    args = bench.parse_args(["--smoke", "--threads", "1"])
    paths = bench.write_inputs(args, params, tmp_path)
    job = dict(bench.base_job(args, params, paths), input=paths["latent_small"], repeats=1, warmup=0)
    row = bench.spawn(job, tmp_path, "one")
    assert row["name"] == "one" and row["peak_rss_gb"] >= row["model_rss_gb"] > 0
    assert Path(row["output"]).is_file()


def test_unknown_lever_and_existing_out_are_one_line(bench, tmp_path, capsys):
    assert bench.main(["--smoke", "--levers", "fp32", "turbo"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --levers takes")
    existing = tmp_path / "there.json"
    existing.write_text("{}")
    assert bench.main(["--smoke", "--out", str(existing)]) == 2
    assert "pass --force" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers is not installed")
def test_diffusers_loads_the_same_weights_and_agrees(bench, tmp_path):
    import torch
    params = bench.vae_config(bench.DEFAULT_CONFIG, smoke=True)
    args = bench.parse_args(["--smoke"])
    paths = bench.write_inputs(args, params, tmp_path)
    ours, theirs = (bench.load_weights(impl, params, paths["weights"]) for impl in ("ours", "diffusers"))
    z = torch.load(paths["latent_small"], weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(theirs.decode(z).sample, ours.decode(z), atol=1e-4, rtol=1e-4)
