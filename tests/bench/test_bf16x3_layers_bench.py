"""bench/bf16x3_layers.py: the split's arithmetic (float32-accurate where plain bfloat16 is not), a --smoke run's
JSON fields, and an existing --out refused."""
import json

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the split uses oneDNN's fused ops")


@pytest.fixture
def bench(load_bench):
    return load_bench("bf16x3_layers")


@pytest.fixture
def fused_bench(bench):
    if not bench.fused_ops_supported():
        pytest.skip("oneDNN's fused bfloat16 ops need AVX-512 or AVX-NE-CONVERT")
    return bench


@pytest.mark.parametrize("kind, shape", [("conv", (24, 40, 3, 1, 12)), ("conv", (24, 16, 3, 2, 12)),
                                         ("conv", (32, 24, 1, 1, 8)), ("linear", (96, 48, 80))])
def test_split_is_float32_accurate_where_bfloat16_is_not(fused_bench, kind, shape):
    row = fused_bench.measure(kind, shape, repeats=1)
    assert row["bf16_err"] > 1e-3
    assert row["bf16x3_err"] < 1e-4
    assert row["fp32_err"] < 1e-5


def test_smoke_run_writes_every_layer(fused_bench, tmp_path, capsys):
    out = tmp_path / "x3.json"
    assert fused_bench.main(["--smoke", "--threads", "1", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["kind"] for r in report["rows"]] == ["conv", "linear"]
    assert set(report["total"]) == {"fp32_ms", "bf16_ms", "bf16x3_ms"}
    assert report["command"].startswith("python bench/bf16x3_layers.py --smoke")
    assert "bf16x3 ms" in capsys.readouterr().out


def test_refuses_an_existing_out(bench, tmp_path, capsys):
    out = tmp_path / "x3.json"
    out.write_text("{}")
    assert bench.main(["--smoke", "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert out.read_text() == "{}"


def test_refuses_in_one_line_where_onednn_cannot_fuse_bfloat16(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "fused_ops_supported", lambda: False)
    out = tmp_path / "x3.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: oneDNN's fused bfloat16 ops need") and err.count("\n") == 1
    assert not out.exists()
