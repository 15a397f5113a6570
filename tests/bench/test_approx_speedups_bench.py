"""bench/approx_speedups.py --smoke end to end on the tiny-width SD 2.x model and the shipped model (the fields of
its JSON, not its numbers: those belong to the benchmark)."""
import json

import pytest

from ldm.errors import UserError


@pytest.fixture
def bench(load_bench):
    return load_bench("approx_speedups")


def test_smoke_run_writes_every_variant_of_both_subjects(bench, tmp_path, capsys):
    out = tmp_path / "approx.json"
    assert bench.main(["--smoke", "--variants", "deepcache-2", "tome-0.5", "int8", "--step-variants", "exact",
                       "deepcache-3", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    sd2, shipped = report["sd2"], report["shipped"]
    assert [r["variant"] for r in sd2["runs"]] == ["exact", "deepcache-2", "tome-0.5", "int8"]
    assert sd2["runs"][0]["psnr_db"] is None and sd2["runs"][0]["latent_relative_rmse"] == 0
    assert all(r["psnr_db"] > 0 and r["seconds"] > 0 for r in sd2["runs"][1:])
    assert [r["step"] for r in sd2["unet_step"]["rows"]] == ["full", "shallow (deep features reused)"]
    assert [r["variant"] for r in shipped["runs"]] == ["exact", "deepcache-2", "tome-0.5", "int8"]
    assert shipped["runs"][2]["settings"]["tome"] == 0.5 and shipped["runs"][2]["settings"]["images"] == 18
    assert {"colour+shape", "shape"} <= set(shipped["runs"][0]["overall"])
    printed = capsys.readouterr().out
    assert "| deepcache-2 |" in printed and "fidelity over all prompts" in printed


def test_an_existing_out_is_refused_before_any_work(bench, tmp_path):
    out = tmp_path / "approx.json"
    out.write_text("{}")
    with pytest.raises(UserError, match="exists; pass --force"):
        bench._main(["--smoke", "--out", str(out)])
    assert out.read_text() == "{}"
