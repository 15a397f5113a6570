"""Checkpoint markers (empty ``v_pred`` / ``ztsnr`` tensors) and the config beside a checkpoint,
through the public loader."""
import logging

import pytest
import torch
from safetensors.torch import save_file

from ldm.checkpoint import load_model, load_state_dict_into
from ldm.config_safety import UntrustedConfigError
from ldm.errors import UserError
from ldm.model_markers import MARKER_KEYS
from ldm.models.diffusion import schedule
from ldm.modules.diffusionmodules.util import make_beta_schedule

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"


def save(sd, path):
    """Write ``sd`` as safetensors or as a Lightning-style .ckpt, by the suffix of ``path``."""
    if path.suffix == ".safetensors":
        save_file(sd, path)
    else:
        torch.save({"state_dict": sd}, path)
    return path


def marked(sd, *markers):
    return {**sd, **{m: torch.tensor([]) for m in markers}}


@pytest.mark.parametrize("name", ["marked.safetensors", "marked.ckpt"])
def test_v_pred_marker_switches_an_eps_config_to_v_and_says_so(tiny_files, tmp_path, caplog, name):
    path = save(marked(tiny_files.state_dict, "v_pred"), tmp_path / name)
    with caplog.at_level(logging.INFO, logger="ldm"):
        model = load_model(tiny_files.config, path, device="cpu")
    assert model.parameterization == "v" and not model.rescale_betas_zero_snr
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("checkpoint marks v-prediction (v_pred key): using parameterization v") and
               "says eps" in m for m in warnings)
    # the weights are the checkpoint's, the marker no weight at all
    assert torch.equal(model.model.diffusion_model.input_blocks[0][0].weight, tiny_files.state_dict[UNET_IN])
    assert not set(MARKER_KEYS) & set(model.state_dict())


@pytest.mark.parametrize("name", ["marked.safetensors", "marked.ckpt"])
def test_ztsnr_marker_gives_the_zero_terminal_snr_schedule(tiny_files, tmp_path, caplog, name):
    # the file keeps the base model's ordinary schedule buffers, as community fine-tunes do
    path = save(marked(tiny_files.state_dict, "v_pred", "ztsnr"), tmp_path / name)
    assert tiny_files.state_dict["alphas_cumprod"][-1] > 0
    with caplog.at_level(logging.WARNING, logger="ldm"):
        model = load_model(tiny_files.config, path, device="cpu")
    assert model.parameterization == "v" and model.rescale_betas_zero_snr
    assert model.alphas_cumprod[-1] == 0
    # the tiny config's schedule: linear from 0.00085 to 0.012 over 1000 steps
    expected = schedule.schedule_buffers(schedule.rescale_zero_terminal_snr(
        make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)))
    for key in ("betas", "alphas_cumprod", "sqrt_alphas_cumprod", "posterior_mean_coef1"):
        torch.testing.assert_close(getattr(model, key), expected[key], rtol=1e-5, atol=1e-7)
    assert "checkpoint marks zero terminal SNR (ztsnr key): using rescale_betas_zero_snr True" in caplog.text


def test_marker_that_agrees_with_the_config_is_no_warning(tiny, tiny_files, tmp_path, caplog):
    config = tiny.write_config(tiny.config(parameterization="v"), tmp_path / "v.yaml")
    path = save(marked(tiny_files.state_dict, "v_pred"), tmp_path / "marked.safetensors")
    with caplog.at_level(logging.INFO, logger="ldm"):
        model = load_model(config, path, device="cpu")
    assert model.parameterization == "v"
    assert "config 'v.yaml' agrees" in caplog.text.replace(str(tmp_path) + "/", "")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "marks" in r.getMessage()]


def test_ztsnr_marker_on_an_eps_model_is_refused(tiny_files, tmp_path):
    path = save(marked(tiny_files.state_dict, "ztsnr"), tmp_path / "marked.safetensors")
    with pytest.raises(UserError, match=r"marks zero terminal SNR \(ztsnr key\) but not v-prediction, and config "
                                        r"'.*tiny-ldm.yaml' says parameterization eps"):
        load_model(tiny_files.config, path, device="cpu")


def test_markers_are_ignored_not_unexpected(tiny, tiny_files):
    report = load_state_dict_into(tiny.build(seed=1), marked(tiny_files.state_dict, "v_pred", "ztsnr"))
    assert report.ok and sorted(report.ignored) == ["v_pred", "ztsnr"]


def test_config_beside_the_checkpoint_is_used(tiny_files, tmp_path, caplog):
    ckpt = save(dict(tiny_files.state_dict), tmp_path / "community-model.safetensors")
    (tmp_path / "community-model.yaml").write_text(tiny_files.config.read_text())
    with caplog.at_level(logging.WARNING, logger="ldm"):
        model = load_model(ckpt_path=ckpt, device="cpu")
    assert torch.equal(model.model.diffusion_model.input_blocks[0][0].weight, tiny_files.state_dict[UNET_IN])
    assert "using the config" in caplog.text and "community-model.yaml found beside the checkpoint" in caplog.text


def test_untrusted_target_in_the_config_beside_the_checkpoint_is_refused(tiny_files, tmp_path):
    ckpt = save(dict(tiny_files.state_dict), tmp_path / "evil.safetensors")
    text = tiny_files.config.read_text().replace("ldm.modules.encoders.modules.CLIPTokenTransformerEmbedder",
                                                 "os.system")
    assert "os.system" in text
    (tmp_path / "evil.yaml").write_text(text)
    with pytest.raises(UntrustedConfigError, match=r"'os.system' at .* of '.*evil.yaml' is outside the trusted"):
        load_model(ckpt_path=ckpt, device="cpu")
