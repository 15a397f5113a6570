"""bench/step_profile.py: a --smoke run on the tiny-width U-Net (the fields of its JSON, not its numbers), the
layer timer's exclusive accounting, and its refusals."""
import json
import time

import pytest
import torch
from torch import nn


@pytest.fixture
def bench(load_bench):
    return load_bench("step_profile")


def test_smoke_run_splits_each_step_into_kinds(bench, tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert bench.main(["--smoke", "--sizes", "8", "--impls", "ours", "--levers", "winograd-all", "--threads", "1",
                       "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [run["name"] for run in report["runs"]] == ["ours", "ours+winograd-all"]
    for run in report["runs"]:
        (row,) = run["rows"]
        split = row["median_run"]
        assert row["size"] == 8 and split["total_s"] > 0
        assert sum(split[f"{kind}_s"] for kind in bench.KINDS) == pytest.approx(split["total_s"])
        assert all(split[f"{kind}_s"] > 0 for kind in ("conv", "linear", "norm", "attention"))
    assert "| ours+winograd-all | 8 |" in capsys.readouterr().out


class Slow(nn.Module):
    def __init__(self, seconds, inner=None):
        super().__init__()
        self.seconds, self.inner = seconds, inner

    def forward(self, x):
        time.sleep(self.seconds)
        return self.inner(x) if self.inner is not None else x


def test_a_layer_is_timed_without_the_timed_layers_inside_it(bench, monkeypatch):
    class Attention(Slow):   # a class name the timer files under "attention"
        pass

    class Linear(nn.Linear):
        def forward(self, x):
            time.sleep(0.05)
            return x

    model = Attention(0.02, inner=Linear(1, 1))
    timer = bench.LayerTimer(model)
    model(torch.zeros(1))
    assert timer.seconds["linear"] == pytest.approx(0.05, abs=0.02)
    assert timer.seconds["attention"] == pytest.approx(0.02, abs=0.015)   # the projection's time not counted twice
    timer.remove()
    timer.reset()
    model(torch.zeros(1))
    assert not timer.seconds


def test_unknown_levers_and_bad_sizes_are_refused_in_one_line(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--levers", "warp-speed", "--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2 and "unknown warp-speed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "12", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
