"""Prompt editing and alternation through the samplers: every sampler resolves a ``ScheduledConditioning``
to the conditioning of the step it is taking, second-order evaluations included.

The references split a run into pieces with constant conditioning, written without the step mechanism
(one-step methods only: a multistep method's history crosses the switch); every sampler is also checked
for the step index it announces at each evaluation.
"""
import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.guidance import GuidedModel, conditioning_at
from ldm.models.diffusion.k_sampler import KDiffusionSampler
from ldm.models.diffusion.k_sampling import K_SAMPLERS
from ldm.models.diffusion.plms import PLMSSampler
from ldm.modules.prompt_conditioning import ScheduledConditioning

SHAPE = [4, 8, 8]


def context(seed):
    return torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(seed))


def latent(seed):
    return torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(seed))


A, B, UNCOND = context(1), context(2), context(3)


def test_conditioning_at_resolves_schedules_inside_dicts_and_lists():
    schedule = ScheduledConditioning([(2, A), (5, B)])
    cond = {"c_concat": [torch.ones(1)], "c_crossattn": [schedule]}
    assert conditioning_at(cond, 1)["c_crossattn"][0] is A and conditioning_at(cond, 2)["c_crossattn"][0] is B
    assert conditioning_at(cond, 4)["c_concat"][0] is cond["c_concat"][0]
    assert conditioning_at(A, 3) is A


class Recorder:
    """Wraps a model's ``apply_model``: records (GuidedModel.step, which conditioning) per evaluation."""

    def __init__(self, model, monkeypatch):
        self.seen = []
        original = model.apply_model

        def apply_model(x, t, cond):
            half = cond[-1:] if cond.shape[0] == 2 * A.shape[0] else cond   # the conditional half's last row
            self.seen.append("A" if torch.equal(half[-1], A[-1]) else "B" if torch.equal(half[-1], B[-1]) else "?")
            return original(x, t, cond)

        monkeypatch.setattr(model, "apply_model", apply_model)


def evaluations_per_step(sampler_name, steps):
    """How many model evaluations each step of ``sampler_name`` makes (second-order steps make two)."""
    two = {"heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde"}
    if sampler_name in two:
        # the last step into sigma = 0 is a first-order one
        return [2] * (steps - 1) + [1]
    if sampler_name == "plms":
        return [2] + [1] * (steps - 1)
    return [1] * steps


def make(name, model):
    if name == "ddim":
        return DDIMSampler(model, device="cpu")
    if name == "plms":
        return PLMSSampler(model, device="cpu")
    if name == "dpm":
        return DPMSolverSampler(model, device="cpu")
    return KDiffusionSampler(model, name, "karras", device="cpu")


@pytest.mark.parametrize("name", ["ddim", "plms", "dpm", *K_SAMPLERS])
def test_every_sampler_switches_the_conditioning_at_the_edit_step(name, eps_model, monkeypatch):
    steps, switch = 5, 2   # "[A:B:2]": steps 0 and 1 use A, steps 2-4 use B
    recorder = Recorder(eps_model, monkeypatch)
    torch.manual_seed(0)
    with torch.no_grad():
        make(name, eps_model).sample(S=steps, batch_size=2, shape=SHAPE, x_T=latent(4), verbose=False,
                                     conditioning=ScheduledConditioning([(switch, A), (steps, B)]),
                                     unconditional_conditioning=UNCOND, unconditional_guidance_scale=3.0,
                                     progress=False)
    counts = evaluations_per_step(name, steps)
    expected_a = sum(counts[:switch])
    if name.startswith("unipc"):
        expected_a = switch   # one evaluation per step: the corrector's belongs to the next step
    seen = recorder.seen
    assert seen == ["A"] * expected_a + ["B"] * (len(seen) - expected_a), (name, seen)
    assert len(seen) > expected_a


def _ddim_pieces(model, x, pieces, steps):
    """DDIM through ``p_sample_ddim`` step by step, each step with the conditioning ``pieces[i]``."""
    sampler = DDIMSampler(model, device="cpu")
    sampler.make_schedule(steps, verbose=False)
    timesteps = list(reversed(sampler.ddim_timesteps))
    for i, t in enumerate(timesteps):
        ts = torch.full((x.shape[0],), int(t), dtype=torch.long)
        torch.manual_seed(100 + i)   # DDIM draws (zero-scaled) noise every step
        x, _ = sampler.p_sample_ddim(x, pieces[i], ts, steps - i - 1, unconditional_guidance_scale=3.0,
                                     unconditional_conditioning=UNCOND)
    return x


def test_ddim_edit_equals_steps_with_each_prompt(eps_model):
    steps = 4
    with torch.no_grad():
        out, _ = DDIMSampler(eps_model, device="cpu").sample(
            S=steps, batch_size=2, shape=SHAPE, x_T=latent(5), verbose=False, progress=False,
            conditioning=ScheduledConditioning([(1, A), (2, B), (3, A), (4, B)]),   # "[A|B]"
            unconditional_conditioning=UNCOND, unconditional_guidance_scale=3.0)
        reference = _ddim_pieces(eps_model, latent(5), [A, B, A, B], steps)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["euler", "heun", "dpm_2"])
def test_one_step_sigma_samplers_edit_equals_two_runs(name, v_model):
    """[A:B:2] over 5 steps == the first 2 steps of the schedule with A, then the other 3 with B
    (the second evaluation of a Heun / DPM2 step uses the step's own prompt)."""
    steps, switch = 5, 2
    k = KDiffusionSampler(v_model, name, "karras", device="cpu")
    with torch.no_grad():
        denoiser_a = k.denoiser(A, UNCOND, 3.0)
        sigmas = k.sigmas_for(steps, denoiser_a)
        x = latent(6) * sigmas[0]
        out = K_SAMPLERS[name](k.denoiser(ScheduledConditioning([(switch, A), (steps, B)]), UNCOND, 3.0), x, sigmas,
                               progress=False)
        half = K_SAMPLERS[name](denoiser_a, x, sigmas[:switch + 1], progress=False)
        reference = K_SAMPLERS[name](k.denoiser(B, UNCOND, 3.0), half, sigmas[switch:], progress=False)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_guided_model_uses_the_step_it_is_told(eps_model):
    guided = GuidedModel(eps_model, ScheduledConditioning([(1, A), (3, B)]), UNCOND, 3.0)
    x, t = latent(7), torch.tensor([500, 500])
    with torch.no_grad():
        first = guided(x, t)
        guided.step = 2
        second = guided(x, t)
        plain = GuidedModel(eps_model, B, UNCOND, 3.0)(x, t)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, plain, rtol=0, atol=0)
