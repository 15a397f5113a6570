"""bench/samplers.py: which runs it makes, and a --smoke run end to end on the tiny model and the
tiny-width SD 2.x U-Net (fields of the JSON, not its numbers: those belong to the benchmark)."""
import json

import pytest


@pytest.fixture
def bench_samplers(load_bench):
    return load_bench("samplers")


ROW_FIELDS = {"sampler", "label", "schedule", "schedule_label", "steps", "stochastic", "image_rmse", "psnr_db",
              "latent_rmse", "seconds", "images_per_s"}


def test_every_sampler_on_every_schedule_unless_quick(bench_samplers):
    b = bench_samplers
    full = b.shipped_pairs(False, b.SAMPLERS, b.SCHEDULES)
    sigma_samplers = [s for s in b.SAMPLERS if b.SAMPLER_BY_NAME[s].uses_sigmas]
    assert len(full) == len(b.SAMPLERS) - len(sigma_samplers) + len(sigma_samplers) * len(b.SCHEDULES)
    assert ("ddim", None) in full and ("euler", "align_your_steps") in full
    quick = b.shipped_pairs(True, b.SAMPLERS, b.SCHEDULES)
    assert len(quick) == len(set(quick)) < len(full)
    assert {("heun", "normal"), ("heun", "karras"), ("dpm", None)} <= set(quick)
    assert ("heun", "beta") not in quick
    assert {sch for s, sch in quick if s == "euler"} == set(b.SCHEDULES)
    assert {sch for s, sch in quick if s == "dpmpp_2m"} == set(b.SCHEDULES)


def test_full_size_subset(bench_samplers):
    b = bench_samplers
    core = b.full_size_runs("core", b.SAMPLERS, b.SCHEDULES, [10, 20])
    assert {r.sampler for r in core} == set(b.FULL_SIZE_CORE)
    assert b.Run("dpmpp_2m", "karras", 20) in core and b.Run("euler", "normal", 10) in core
    assert {r.schedule for r in core if r.sampler == "dpmpp_2m"} == set(b.SCHEDULES)
    everything = b.full_size_runs("all", b.SAMPLERS, b.SCHEDULES, [10, 20])
    assert {r.sampler for r in everything} == set(b.SAMPLERS)
    assert len(everything) == len(set(everything))   # DPM++ 2M Karras at 20 steps once, not twice


def test_stochastic_follows_the_function_a_sampler_runs(bench_samplers):
    b = bench_samplers
    assert b.is_stochastic("euler_ancestral") and b.is_stochastic("dpmpp_2m_sde_heun")
    assert not b.is_stochastic("euler") and not b.is_stochastic("ddim")


def test_a_deterministic_sampler_moving_away_with_steps_is_noted(bench_samplers):
    rows = [{"label": "Euler", "schedule_label": "Karras", "stochastic": False, "steps": n, "latent_rmse": v}
            for n, v in ((10, 0.2), (20, 0.1), (30, 0.3))]
    rows += [{"label": "Euler a", "schedule_label": "Karras", "stochastic": True, "steps": n, "latent_rmse": v}
             for n, v in ((10, 0.2), (20, 0.4))]
    rows += [{"label": "Heun", "schedule_label": "Uniform", "stochastic": False, "steps": n, "latent_rmse": v}
             for n, v in ((20, 0.05), (10, 0.1))]
    (note,) = bench_samplers.not_falling(rows, "shipped", floor=0.01)
    assert note.startswith("shipped: Euler on Karras does not get closer")
    assert "10 steps 0.2, 20 steps 0.1, 30 steps 0.3" in note
    # on the reference's own noise floor a distance may wobble: not a note
    assert bench_samplers.not_falling(rows, "shipped", floor=0.2) == []


def test_refuses_an_existing_out_before_loading_a_model(bench_samplers, tmp_path, capsys):
    committed = tmp_path / "samplers.json"
    committed.write_text("{}")
    assert bench_samplers.main(["--ckpt", "missing.ckpt", "--config", "missing.yaml", "--out", str(committed)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {committed} exists; pass --force to replace it, or leave out --out to write a new file"]


def test_smoke_run_writes_every_field(bench_samplers, tiny_files, tmp_path, capsys):
    args = ["--smoke", "--threads", "1", "--ckpt", str(tiny_files.ckpt), "--config", str(tiny_files.config),
            "--samplers", "DDIM", "Euler", "--steps", "2"]
    assert bench_samplers.main(args) == 0
    (written,) = (tmp_path / "results").iterdir()
    assert written.name.startswith("samplers-")
    report = json.loads(written.read_text())
    assert report["command"] == "python bench/samplers.py " + " ".join(args)
    assert report["machine"]["threads"] == 1 and report["machine"]["cpu_capability"]
    shipped, sd2 = report["subjects"]["shipped"], report["subjects"]["sd2-random"]
    # DDIM (no schedule) + Euler on each of the 7 schedules, at 2 steps
    assert [(r["label"], r["steps"]) for r in shipped["rows"]] == [("DDIM", 2)] + [("Euler", 2)] * 7
    assert {r["schedule_label"] for r in shipped["rows"]} == {"-", *bench_samplers.SCHEDULE_LABELS.values()}
    for r in shipped["rows"]:
        assert set(r) == ROW_FIELDS and r["image_rmse"] is not None and r["images_per_s"] > 0
    assert len(shipped["prompts"]) == 2 and shipped["reference"]["steps"] == 8
    assert {"end_sigma", "floor_latent_rmse", "floor_image_rmse", "floor_psnr_db"} <= set(shipped["reference"])
    assert "floor_latent_rmse" in sd2["reference"] and "floor_image_rmse" not in sd2["reference"]
    # the full-size subset: DDIM and Euler at their defaults, no image columns (there is no decoder)
    assert [(r["label"], r["schedule_label"]) for r in sd2["rows"]] == [("DDIM", "-"), ("Euler", "Uniform")]
    assert all(r["image_rmse"] is None and r["latent_rmse"] is not None for r in sd2["rows"])
    assert sd2["context_shape"][1:] == [77, 1024]
    out = capsys.readouterr().out
    assert "| sampler | schedule | steps | image RMSE | PSNR dB | latent RMSE | images/s |" in out
    assert "| Euler | Align Your Steps | 2 |" in out
    assert "| sampler | schedule | PSNR dB 2 | images/s 2 |" in out            # the summary
    assert bench_samplers.main(["--table-from", str(written)]) == 0           # the same tables from the file
    assert capsys.readouterr().out == out.replace(f"wrote {written}\n", "")


def test_ddim_at_the_reference_steps_is_the_reference(bench_samplers, tiny_files, tmp_path):
    """Every run starts from the subject's seeded start noise: DDIM with the reference's steps lands exactly on it."""
    out = tmp_path / "same.json"
    assert bench_samplers.main(["--smoke", "--threads", "1", "--ckpt", str(tiny_files.ckpt), "--config",
                                str(tiny_files.config), "--samplers", "ddim", "--steps", "3", "--reference-steps",
                                "3", "--out", str(out)]) == 0
    for subject in json.loads(out.read_text())["subjects"].values():
        (r,) = subject["rows"]
        assert r["latent_rmse"] == 0.0 and r["psnr_db"] is None
