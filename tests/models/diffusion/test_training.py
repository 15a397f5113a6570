import math

import numpy as np
import pytest
import torch

from ldm.errors import UserError
from ldm.lr_scheduler import LambdaLinearScheduler, LambdaWarmUpCosineScheduler, LambdaWarmUpCosineScheduler2
from ldm.models.diffusion.training import drop_conditioning

SCHEDULER = {"target": "ldm.lr_scheduler.LambdaLinearScheduler",
             "params": {"warm_up_steps": [4], "cycle_lengths": [10000000000000], "f_start": [1e-6],
                        "f_max": [1.], "f_min": [1.]}}


def _shapes_batch(n=4, size=16, seed=0):
    from ldm.data.shapes import ShapesTrain
    data = ShapesTrain(size=size, length=64, seed=seed)
    items = [data[i] for i in range(n)]
    return {"jpg": torch.from_numpy(np.stack([it["image"] for it in items])),
            "txt": [it["caption"] for it in items]}


def _trainable_model(tiny, **params):
    params = {"cond_stage_trainable": True, **params}
    model = tiny.build(tiny.config(**params)).train()
    model.learning_rate = 1e-3
    return model


# ---------------------------------------------------------------------------------------------- schedulers

def test_lambda_linear_scheduler_warm_up_then_constant():
    s = LambdaLinearScheduler(warm_up_steps=[10], f_min=[1.], f_max=[1.], f_start=[1e-6], cycle_lengths=[1e13])
    assert s(0) == pytest.approx(1e-6)
    assert s(5) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(10 ** 6) == pytest.approx(1.0)


def test_lambda_linear_scheduler_decays_linearly_over_cycles():
    s = LambdaLinearScheduler(warm_up_steps=[2, 0], f_min=[0.0, 0.5], f_max=[1.0, 1.0], f_start=[0.0, 1.0],
                              cycle_lengths=[10, 10])
    assert s(1) == pytest.approx(0.5)
    assert s(4) == pytest.approx(0.6)  # f_min + (f_max - f_min) * (10 - 4) / 10
    assert s(10) == pytest.approx(0.0)  # a cycle includes its end step
    assert s(15) == pytest.approx(0.5 + 0.5 * 5 / 10)  # second cycle, 5 steps in
    assert s(25) == s(20) == pytest.approx(0.5)  # past the last cycle: its final value


def test_cosine_schedulers():
    s = LambdaWarmUpCosineScheduler(warm_up_steps=4, lr_min=0.1, lr_max=1.0, lr_start=0.0, max_decay_steps=14)
    assert s(2) == pytest.approx(0.5)
    assert s(4) == pytest.approx(1.0)
    assert s(9) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert s(100) == pytest.approx(0.1)
    s2 = LambdaWarmUpCosineScheduler2(warm_up_steps=[0], f_min=[0.0], f_max=[2.0], f_start=[0.0], cycle_lengths=[8])
    assert s2(4) == pytest.approx(1.0)
    with pytest.raises(UserError, match="same"):
        LambdaWarmUpCosineScheduler2(warm_up_steps=[1, 2], f_min=[0.], f_max=[1.], f_start=[0.], cycle_lengths=[5])


def test_scheduler_config_drives_the_optimizer_lr(tiny):
    model = _trainable_model(tiny, scheduler_config=SCHEDULER)
    optimizers, schedulers = model.configure_optimizers()
    opt, sched = optimizers[0], schedulers[0]["scheduler"]
    assert schedulers[0]["interval"] == "step"
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [1e-3 * (1e-6 + (1 - 1e-6) * n / 4) for n in range(4)] + [1e-3, 1e-3]
    assert lrs == pytest.approx(expected)
    # the scheduler state must survive torch.load(weights_only=True) inside a Lightning checkpoint
    import io
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["last_epoch"] == 6


def test_trainable_parameters_include_text_encoder_and_logvar(tiny):
    model = _trainable_model(tiny, learn_logvar=True)
    params = {id(p) for p in model.trainable_parameters()}
    assert all(id(p) in params for p in model.cond_stage_model.parameters())
    assert id(model.logvar) in params
    assert not any(id(p) in params for p in model.first_stage_model.parameters())


# ---------------------------------------------------------------------------------------------- ucg dropout

def test_drop_conditioning_rate_and_official_draw_order():
    captions = [f"caption {i}" for i in range(4000)]
    batch = drop_conditioning({"txt": list(captions)}, {"txt": {"p": 0.25, "val": ""}}, np.random.RandomState(0))
    dropped = [c == "" for c in batch["txt"]]
    assert abs(np.mean(dropped) - 0.25) < 0.03
    reference = np.random.RandomState(0)
    assert dropped == [bool(reference.choice(2, p=[0.75, 0.25])) for _ in captions]
    kept = [c for c, d in zip(batch["txt"], dropped) if not d]
    assert kept == [c for c, d in zip(captions, dropped) if not d]


def test_drop_conditioning_extremes_and_bad_key():
    rng = np.random.RandomState(0)
    assert drop_conditioning({"txt": ("a", "b")}, {"txt": {"p": 1.0, "val": None}}, rng)["txt"] == ["", ""]
    assert drop_conditioning({"txt": ["a", "b"]}, {"txt": {"p": 0.0, "val": ""}}, rng)["txt"] == ["a", "b"]
    with pytest.raises(UserError, match="caption"):
        drop_conditioning({"txt": ["a"]}, {"caption": {"p": 0.1, "val": ""}}, rng)


def test_training_step_applies_ucg_with_seeded_rng(tiny):
    model = _trainable_model(tiny, ucg_training={"txt": {"p": 0.5, "val": ""}})
    torch.manual_seed(123)  # the conditioning-dropout RNG is seeded from torch's seed
    batch = _shapes_batch(n=4)
    original = list(batch["txt"])
    model.training_step(batch, 0)
    expected_rng = np.random.RandomState(123)
    expected = ["" if expected_rng.choice(2, p=[0.5, 0.5]) else c for c in original]
    assert batch["txt"] == expected


# ---------------------------------------------------------------------------------------------- learning

def test_loss_goes_down_on_a_fixed_batch(tiny):
    torch.manual_seed(0)
    model = _trainable_model(tiny)
    batch = _shapes_batch(n=4)
    z, c = model.get_input(batch, model.first_stage_key)
    t = torch.tensor([50, 300, 600, 900])
    noise = torch.randn_like(z)

    def fixed_loss():
        with torch.no_grad():
            return model.p_losses(z, model.get_learned_conditioning(c), t, noise=noise)[0].item()

    encoder_before = model.cond_stage_model.token_embedding.weight.detach().clone()
    before = fixed_loss()
    opt = model.configure_optimizers()
    for step in range(30):
        loss = model.training_step(batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_loss()
    assert after < 0.7 * before, (before, after)
    assert not torch.equal(model.cond_stage_model.token_embedding.weight, encoder_before)


@pytest.mark.parametrize("parameterization,loss_type", [("v", "l1"), ("eps", "l2")])
def test_training_step_gives_gradients_with_learned_logvar(tiny, parameterization, loss_type):
    torch.manual_seed(0)
    model = _trainable_model(tiny, parameterization=parameterization, loss_type=loss_type, learn_logvar=True)
    loss = model.training_step(_shapes_batch(n=2), 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.logvar.grad is not None and model.logvar.grad.abs().sum() > 0
    assert model.model.diffusion_model.out[2].weight.grad.abs().sum() > 0


def test_ema_update_after_batch(tiny):
    torch.manual_seed(0)
    model = _trainable_model(tiny, use_ema=True)
    opt = model.configure_optimizers()
    loss = model.training_step(_shapes_batch(n=2), 0)
    loss.backward()
    opt.step()
    model.on_train_batch_end(None, None, 0)
    assert int(model.model_ema.num_updates) == 1
    name = "diffusion_modelout2weight"
    ema, live = getattr(model.model_ema, name), model.model.diffusion_model.out[2].weight
    # first update uses decay min(0.9999, 2/11): the average moves most of the way to the new weights
    assert not torch.equal(ema, live)
    assert (ema - live).abs().max() < (live.grad.abs().max() + 1)  # sanity: same magnitude


def test_scale_by_std_sets_factor_from_first_batch(tiny):
    torch.manual_seed(0)
    model = tiny.build(tiny.config(scale_by_std=True, scale_factor=1.0)).train()
    batch = _shapes_batch(n=4)
    torch.manual_seed(7)
    model.on_train_batch_start(batch, 0)
    torch.manual_seed(7)
    x = model.first_stage_model.get_input(batch, "jpg")
    z = model.encode_first_stage(x).sample()
    assert float(model.scale_factor) == pytest.approx(1.0 / z.flatten().std().item(), rel=1e-5)
    assert "scale_factor" in model.state_dict()  # persistent: checkpoints keep the data-derived factor


def test_scale_by_std_needs_unit_factor(tiny):
    model = tiny.build(tiny.config(scale_by_std=True, scale_factor=0.5)).train()
    with pytest.raises(UserError, match="scale_factor"):
        model.on_train_batch_start(_shapes_batch(n=2), 0)


# ---------------------------------------------------------------------------------------------- log_images

def test_log_images_panels(tiny):
    torch.manual_seed(0)
    model = _trainable_model(tiny, use_ema=True).eval()
    batch = _shapes_batch(n=3)
    log = model.log_images(batch, N=2, ddim_steps=2, unconditional_guidance_scale=3.0, inpaint=True,
                           plot_denoise_rows=True)
    assert {"inputs", "reconstruction", "conditioning", "diffusion_row", "samples", "denoise_row",
            "samples_cfg_scale_3.00", "samples_inpainting", "samples_outpainting", "mask"} <= set(log)
    for key in ("inputs", "reconstruction", "samples", "samples_cfg_scale_3.00", "samples_inpainting"):
        assert log[key].shape == (2, 3, 16, 16), key
    assert log["conditioning"].shape[0] == 2 and log["conditioning"].min() >= -1
    assert log["mask"].shape == (2, 1, 8, 8)
    # guidance against "" changes the samples
    assert not torch.allclose(log["samples"], log["samples_cfg_scale_3.00"])
    assert model.training is False


def test_log_images_uses_the_empty_prompt_as_unconditional(tiny, monkeypatch):
    from ldm.models.diffusion import image_logging
    model = _trainable_model(tiny).eval()
    seen = []
    original = model.get_learned_conditioning
    monkeypatch.setattr(model, "get_learned_conditioning", lambda c: seen.append(c) or original(c))
    image_logging.unconditional_conditioning(model, 3)
    assert seen == [["", "", ""]]


# ---------------------------------------------------------------------------------- offset noise, Min-SNR
def test_offset_noise_shifts_each_sample_and_channel(tiny):
    plain, offset = (tiny.build(tiny.config(offset_noise_strength=s)) for s in (0.0, 0.5))
    x = torch.zeros(256, 4, 16, 16)
    torch.manual_seed(0)
    reference = torch.randn_like(x)
    torch.manual_seed(0)
    assert torch.equal(plain.training_noise(x), reference)          # off: the official N(0, I)
    noise = offset.training_noise(x)
    means = noise.mean(dim=(2, 3))                                   # [B, C]: 1/256 + 0.25 in variance
    assert means.var().item() == pytest.approx(0.25 + 1 / 256, rel=0.15)
    assert (noise - means[..., None, None]).std().item() == pytest.approx(1.0, rel=0.02)
    with pytest.raises(UserError, match="offset_noise_strength"):
        tiny.build(tiny.config(offset_noise_strength=-0.1))


@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
def test_min_snr_weights(tiny, parameterization):
    model = tiny.build(tiny.config(parameterization=parameterization, snr_gamma=5.0))
    t = torch.tensor([0, 200, 500, 999])
    alpha_bar = model.alphas_cumprod[t].double()
    snr = alpha_bar / (1 - alpha_bar)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0))
    expected = {"eps": expected / snr, "v": expected / (snr + 1), "x0": expected}[parameterization]
    torch.testing.assert_close(model.loss_weights(t).double(), expected, rtol=1e-5, atol=0)
    assert torch.equal(tiny.build(tiny.config(parameterization=parameterization)).loss_weights(t), torch.ones(4))
    # the loss is the weighted per-sample loss
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    out = torch.randn(4, 4, 8, 8)
    loss, logged = model.loss_from_output(out, x0, noise, t)
    per_sample = ((model.training_target(x0, noise, t) - out) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(logged["val/loss_simple"], (per_sample * model.loss_weights(t)).mean())
    with pytest.raises(UserError, match="snr_gamma"):
        tiny.build(tiny.config(snr_gamma=0))


def test_min_snr_gives_the_zero_snr_step_no_weight(tiny):
    model = tiny.build(tiny.config(parameterization="v", rescale_betas_zero_snr=True, snr_gamma=5.0))
    assert model.loss_weights(torch.tensor([999])).item() == 0.0


def test_snr_weight_floor_bounds_min_snr_weights_from_below(tiny):
    config = dict(parameterization="v", rescale_betas_zero_snr=True, snr_gamma=5.0)
    plain, floored = tiny.build(tiny.config(**config)), tiny.build(tiny.config(**config, snr_weight_floor=0.1))
    t = torch.tensor([999, 900, 500, 100, 0])
    expected = plain.loss_weights(t).clamp(min=0.1)
    torch.testing.assert_close(floored.loss_weights(t), expected)
    assert floored.loss_weights(torch.tensor([999])).item() == pytest.approx(0.1)
    above = plain.loss_weights(t) > 0.1
    assert above.any() and torch.equal(floored.loss_weights(t)[above], plain.loss_weights(t)[above])
    with pytest.raises(UserError, match="set snr_gamma too"):
        tiny.build(tiny.config(parameterization="v", snr_weight_floor=0.1))
    with pytest.raises(UserError, match="between 0 and 1"):
        tiny.build(tiny.config(**config, snr_weight_floor=2.0))
