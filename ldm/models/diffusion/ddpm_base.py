"""DDPM: the denoising diffusion model in pixel space, and the wrapper that routes conditioning.

LatentDiffusion (latent_diffusion.py) builds on this class; the training loop lives in
training.py. Attribute names here are checkpoint keys: ``model.diffusion_model.*``, the schedule
buffers at the root, ``model_ema.*``.
"""
import logging
from contextlib import contextmanager

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import UserError
from ldm.models.diffusion import schedule
from ldm.models.diffusion.training import DiffusionTrainingMixin
from ldm.models.init_ckpt import InitFromCheckpoint
from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule
from ldm.modules.ema import LitEma
from ldm.modules.freeze import disabled_train  # noqa: F401  (official import path: ldm.models.diffusion.ddpm)
from ldm.util import count_params, default, instantiate_from_config

logger = logging.getLogger(__name__)

CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm", "hybrid-adm", "crossattn-adm")


class DiffusionWrapper(pl.LightningModule):
    """Feeds the U-Net its conditioning: concatenated to the input, as cross-attention context, or as ``y``."""

    def __init__(self, diff_model_config, conditioning_key):
        super().__init__()
        self.sequential_cross_attn = diff_model_config.pop("sequential_crossattn", False)
        self.diffusion_model = instantiate_from_config(diff_model_config)
        if conditioning_key not in CONDITIONING_KEYS:
            raise UserError(f"conditioning_key {conditioning_key!r} is not one of {CONDITIONING_KEYS}")
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_concat=None, c_crossattn=None, c_adm=None):
        key = self.conditioning_key
        if key is None:
            return self.diffusion_model(x, t)
        if key == "concat":
            return self.diffusion_model(torch.cat([x] + c_concat, dim=1), t)
        if key == "crossattn":
            cc = c_crossattn if self.sequential_cross_attn else torch.cat(c_crossattn, 1)
            return self.diffusion_model(x, t, context=cc)
        if key == "hybrid":
            return self.diffusion_model(torch.cat([x] + c_concat, dim=1), t, context=torch.cat(c_crossattn, 1))
        if key == "hybrid-adm":
            assert c_adm is not None
            return self.diffusion_model(torch.cat([x] + c_concat, dim=1), t, context=torch.cat(c_crossattn, 1),
                                        y=c_adm)
        if key == "crossattn-adm":
            assert c_adm is not None
            return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1), y=c_adm)
        # "adm": the conditioning vector is the class embedding input
        return self.diffusion_model(x, t, y=c_crossattn[0])


class DDPM(DiffusionTrainingMixin, InitFromCheckpoint, pl.LightningModule):
    """Gaussian diffusion (Ho et al. 2020) with eps, x0 or v parameterisation.

    ``ckpt_path`` is loaded after the most-derived constructor has built every sub-model (see
    ldm/models/init_ckpt.py), so subclasses add sub-models without any loading code.

    ``rescale_betas_zero_snr`` (default False) rescales the beta schedule to zero terminal SNR
    (Lin et al. 2023, Algorithm 1: alpha_bar_T = 0, alpha_bar_1 unchanged); it needs a v- (or
    x0-) model, and samplers must reach the last timestep (``timestep_spacing`` "trailing").

    Training options beyond the official ones: ``offset_noise_strength`` adds ``strength`` times one
    normal draw per sample and channel to the training noise (offset noise, Guttenberg 2023; diffusers'
    ``noise_offset``), so that the model learns to change an image's mean; ``snr_gamma`` weights
    each sample's loss by min(SNR, gamma) over the weight its parameterisation already gives SNR
    (Min-SNR-gamma, Hang et al. 2023: / SNR for eps, / (SNR + 1) for v, 1 for x0; 5 in the paper).
    ``snr_weight_floor`` keeps those weights at or above a floor: for a v-model at zero terminal SNR
    Min-SNR gives the noisiest steps, where layout and background are decided, almost no weight
    (exactly 0 at t = T).
    """

    def __init__(self, unet_config, timesteps=1000, beta_schedule="linear", loss_type="l2", ckpt_path=None,
                 ignore_keys=(), load_only_unet=False, monitor="val/loss", use_ema=True, first_stage_key="image",
                 image_size=256, channels=3, log_every_t=100, clip_denoised=True, linear_start=1e-4,
                 linear_end=2e-2, cosine_s=8e-3, given_betas=None, original_elbo_weight=0., v_posterior=0.,
                 l_simple_weight=1., conditioning_key=None, parameterization="eps", scheduler_config=None,
                 use_positional_encodings=False, learn_logvar=False, logvar_init=0., make_it_fit=False,
                 ucg_training=None, reset_ema=False, reset_num_ema_updates=False, ema_decay=0.9999,
                 rescale_betas_zero_snr=False, offset_noise_strength=0.0, snr_gamma=None,
                 snr_weight_floor=0.0):
        super().__init__()
        if parameterization not in ("eps", "x0", "v"):
            raise UserError(f"parameterization {parameterization!r} is not supported (use eps, x0 or v)")
        if rescale_betas_zero_snr and parameterization == "eps":
            # at alpha_bar_T = 0, x_T is the noise itself: predicting eps there is trivial and
            # x0 = (x_T - eps) / 0 is undefined (Lin et al. 2023, sec. 3.2)
            raise UserError("rescale_betas_zero_snr needs parameterization 'v' (or 'x0'): at zero terminal "
                            "SNR an eps-prediction model cannot give x0 at the last timestep")
        if offset_noise_strength < 0:
            raise UserError(f"offset_noise_strength must be 0 or more, got {offset_noise_strength}")
        if snr_gamma is not None and snr_gamma <= 0:
            raise UserError(f"snr_gamma must be positive (5 in the Min-SNR paper), got {snr_gamma}")
        self.offset_noise_strength = float(offset_noise_strength)
        if snr_weight_floor and snr_gamma is None:
            raise UserError("snr_weight_floor bounds the Min-SNR weights from below: set snr_gamma too")
        if not 0 <= snr_weight_floor <= 1:
            raise UserError(f"snr_weight_floor must be between 0 and 1, got {snr_weight_floor}")
        self.snr_gamma = snr_gamma
        self.snr_weight_floor = float(snr_weight_floor)
        self.parameterization = parameterization
        # zero terminal SNR (Lin et al. 2023); the schedule buffers are derived from it, so loaders
        # keep the model's own (see ldm.model_markers.derived_schedule_keys)
        self.rescale_betas_zero_snr = bool(rescale_betas_zero_snr)
        logger.info("%s: running in %s-prediction mode", self.__class__.__name__, parameterization)
        self.cond_stage_model = None
        self.clip_denoised = clip_denoised
        self.log_every_t = log_every_t
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.use_positional_encodings = use_positional_encodings
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        count_params(self.model)
        self.use_ema = use_ema
        self.ema_decay = ema_decay
        if self.use_ema:
            self.model_ema = self.build_ema()
        elif reset_ema or reset_num_ema_updates:
            raise UserError("reset_ema and reset_num_ema_updates need use_ema: True")
        self.reset_ema = reset_ema
        self.reset_num_ema_updates = reset_num_ema_updates
        self.use_scheduler = scheduler_config is not None
        if self.use_scheduler:
            self.scheduler_config = scheduler_config
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        if monitor is not None:
            self.monitor = monitor
        self.make_it_fit = make_it_fit
        self.ucg_training = ucg_training or dict()
        self.register_schedule(given_betas=given_betas, beta_schedule=beta_schedule, timesteps=timesteps,
                               linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s)
        self.loss_type = loss_type
        self.learn_logvar = learn_logvar
        logvar = torch.full(fill_value=logvar_init, size=(self.num_timesteps,))
        if self.learn_logvar:
            self.logvar = nn.Parameter(logvar, requires_grad=True)
        else:
            self.register_buffer("logvar", logvar, persistent=False)
        self.request_init_checkpoint(ckpt_path, ignore_keys, only_model=load_only_unet)

    def build_ema(self):
        """A fresh EMA of the denoiser's current weights, decaying at ``ema_decay``."""
        return LitEma(self.model, decay=self.ema_decay)

    def load_init_checkpoint(self):
        """Load ``ckpt_path``; then ``reset_ema`` restarts the EMA from the loaded weights (for
        checkpoints that hold only EMA weights) and ``reset_num_ema_updates`` its decay warm-up."""
        self.restarted_from_ckpt = super().load_init_checkpoint()
        if self.restarted_from_ckpt and self.reset_ema:
            self.model_ema = self.build_ema()
        if self.reset_num_ema_updates:
            self.model_ema.reset_num_updates()
        return self.restarted_from_ckpt

    # ------------------------------------------------------------------ schedule
    def register_schedule(self, given_betas=None, beta_schedule="linear", timesteps=1000, linear_start=1e-4,
                          linear_end=2e-2, cosine_s=8e-3):
        if given_betas is not None:
            betas = given_betas
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end,
                                       cosine_s=cosine_s)
        if self.rescale_betas_zero_snr:
            betas = schedule.rescale_zero_terminal_snr(betas)
        self.num_timesteps = int(len(betas))
        self.linear_start = linear_start
        self.linear_end = linear_end
        buffers = schedule.schedule_buffers(betas, v_posterior=self.v_posterior)
        for name, value in buffers.items():
            self.register_buffer(name, value)
        self.register_buffer("lvlb_weights", schedule.lvlb_weights(buffers, self.parameterization), persistent=False)

    @contextmanager
    def ema_scope(self, context=None):
        """Temporarily swap the EMA weights into the model (no-op without EMA)."""
        if self.use_ema:
            self.model_ema.store(self.model.parameters())
            self.model_ema.copy_to(self.model)
            if context is not None:
                logger.info("%s: switched to EMA weights", context)
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(self.model.parameters())
                if context is not None:
                    logger.info("%s: restored training weights", context)

    def _coef(self, name, t, x):
        return extract_into_tensor(getattr(self, name), t, x.shape)

    # ------------------------------------------------------------------ eps / x0 / v algebra
    def q_mean_variance(self, x_start, t):
        mean = self._coef("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = 1.0 - self._coef("alphas_cumprod", t, x_start)
        log_variance = self._coef("log_one_minus_alphas_cumprod", t, x_start)
        return mean, variance, log_variance

    def predict_start_from_noise(self, x_t, t, noise):
        return self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - \
            self._coef("sqrt_recipm1_alphas_cumprod", t, x_t) * noise

    def predict_start_from_z_and_v(self, x_t, t, v):
        return schedule.x0_from_v(x_t, v, self._coef("sqrt_alphas_cumprod", t, x_t),
                                  self._coef("sqrt_one_minus_alphas_cumprod", t, x_t))

    def predict_eps_from_z_and_v(self, x_t, t, v):
        return schedule.eps_from_v(x_t, v, self._coef("sqrt_alphas_cumprod", t, x_t),
                                   self._coef("sqrt_one_minus_alphas_cumprod", t, x_t))

    def q_posterior(self, x_start, x_t, t):
        mean = self._coef("posterior_mean_coef1", t, x_t) * x_start + self._coef("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._coef("posterior_variance", t, x_t), self._coef("posterior_log_variance_clipped", t, x_t)

    def q_sample(self, x_start, t, noise=None):
        noise = default(noise, lambda: torch.randn_like(x_start))
        return schedule.q_sample(x_start, noise, self._coef("sqrt_alphas_cumprod", t, x_start),
                                 self._coef("sqrt_one_minus_alphas_cumprod", t, x_start))

    def get_v(self, x, noise, t):
        """The v target for clean ``x`` and ``noise`` at ``t`` (note the argument order: x, noise, t)."""
        return schedule.v_from_x0_eps(x, noise, self._coef("sqrt_alphas_cumprod", t, x),
                                      self._coef("sqrt_one_minus_alphas_cumprod", t, x))

    # ------------------------------------------------------------------ ancestral sampling in pixel space
    def p_mean_variance(self, x, t, clip_denoised: bool):
        model_out = self.model(x, t)
        if self.parameterization == "eps":
            x_recon = self.predict_start_from_noise(x, t=t, noise=model_out)
        elif self.parameterization == "v":
            x_recon = self.predict_start_from_z_and_v(x, t, model_out)
        else:
            x_recon = model_out
        if clip_denoised:
            x_recon.clamp_(-1., 1.)
        return self.q_posterior(x_start=x_recon, x_t=x, t=t)

    @torch.no_grad()
    def p_sample(self, x, t, clip_denoised=True):
        mean, _, log_variance = self.p_mean_variance(x=x, t=t, clip_denoised=clip_denoised)
        noise = torch.randn_like(x)
        nonzero_mask = (t != 0).float().reshape(x.shape[0], *((1,) * (x.ndim - 1)))  # no noise at t == 0
        return mean + nonzero_mask * (0.5 * log_variance).exp() * noise

    @torch.no_grad()
    def sample(self, batch_size=16, return_intermediates=False):
        shape = (batch_size, self.channels, self.image_size, self.image_size)
        img = torch.randn(shape, device=self.betas.device)
        intermediates = [img]
        for i in reversed(range(self.num_timesteps)):
            img = self.p_sample(img, torch.full((batch_size,), i, device=img.device, dtype=torch.long),
                                clip_denoised=self.clip_denoised)
            if i % self.log_every_t == 0 or i == self.num_timesteps - 1:
                intermediates.append(img)
        return (img, intermediates) if return_intermediates else img

    # ------------------------------------------------------------------ loss
    def get_loss(self, pred, target, mean=True):
        if self.loss_type == "l1":
            loss = (target - pred).abs()
            return loss.mean() if mean else loss
        if self.loss_type == "l2":
            return F.mse_loss(target, pred) if mean else F.mse_loss(target, pred, reduction="none")
        raise NotImplementedError(f"loss_type {self.loss_type!r} (use l1 or l2)")

    def training_target(self, x_start, noise, t):
        if self.parameterization == "eps":
            return noise
        if self.parameterization == "x0":
            return x_start
        return self.get_v(x_start, noise, t)

    def training_noise(self, x_start):
        """The noise of a training step: N(0, I), plus the offset noise when it is on."""
        noise = torch.randn_like(x_start)
        if self.offset_noise_strength:
            offset = torch.randn(*x_start.shape[:2], *([1] * (x_start.ndim - 2)), device=x_start.device,
                                 dtype=x_start.dtype)
            noise = noise + self.offset_noise_strength * offset
        return noise

    _item_weights = None  # (name, [B] tensor) while item_loss_weights() is active

    @contextmanager
    def item_loss_weights(self, weights, name="loss_weight"):
        """Within it, each batch item's loss weight is also multiplied by its entry of ``weights`` [B] (None: no
        change): DreamBooth's class examples, an adapter training's regularisation images (prior_loss_weight).
        ``name`` is what an error calls them."""
        previous = self._item_weights
        self._item_weights = None if weights is None else (name, torch.as_tensor(weights))
        try:
            yield
        finally:
            self._item_weights = previous

    def loss_weights(self, t):
        """Per-sample loss weights [B] at timesteps ``t``: ones, or Min-SNR-gamma's (see the class docstring),
        times the item weights of :meth:`item_loss_weights`."""
        if self.snr_gamma is None:
            weights = torch.ones(t.shape, device=t.device)
        else:
            alpha_bar = self.alphas_cumprod[t].float()
            snr = alpha_bar / (1 - alpha_bar)
            clipped = snr.clamp(max=self.snr_gamma)
            if self.parameterization == "eps":
                weights = clipped / snr
            elif self.parameterization == "v":
                weights = clipped / (snr + 1)
            else:
                weights = clipped
            weights = weights.clamp(min=self.snr_weight_floor)
        if self._item_weights is None:
            return weights
        name, items = self._item_weights
        if items.shape != weights.shape:
            raise ValueError(f"{name} has shape {tuple(items.shape)} for a batch of {len(weights)}")
        return weights * items.to(weights)

    def p_losses(self, x_start, t, noise=None):
        noise = default(noise, lambda: self.training_noise(x_start))
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        model_out = self.model(x_noisy, t)
        return self.loss_from_output(model_out, x_start, noise, t)

    def loss_from_output(self, model_output, x_start, noise, t):
        """Simple loss (per-timestep learned-variance weighted) plus the weighted VLB term."""
        prefix = "train" if self.training else "val"
        target = self.training_target(x_start, noise, t)
        per_sample = self.get_loss(model_output, target, mean=False).mean(dim=list(range(1, target.ndim)))
        per_sample = per_sample * self.loss_weights(t).to(per_sample)
        loss_dict = {f"{prefix}/loss_simple": per_sample.mean()}
        logvar_t = self.logvar[t].to(per_sample.device)
        loss = per_sample / torch.exp(logvar_t) + logvar_t
        if self.learn_logvar:
            loss_dict[f"{prefix}/loss_gamma"] = loss.mean()
            loss_dict["logvar"] = self.logvar.data.mean()
        loss = self.l_simple_weight * loss.mean()
        loss_vlb = (self.lvlb_weights[t] * per_sample).mean()
        loss_dict[f"{prefix}/loss_vlb"] = loss_vlb
        loss = loss + self.original_elbo_weight * loss_vlb
        loss_dict[f"{prefix}/loss"] = loss
        return loss, loss_dict

    def forward(self, x, *args, **kwargs):
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=self.device).long()
        return self.p_losses(x, t, *args, **kwargs)

    def get_input(self, batch, k):
        """Dataset images are [B, H, W, C]; the networks want contiguous float [B, C, H, W]."""
        x = batch[k]
        if x.ndim == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()
