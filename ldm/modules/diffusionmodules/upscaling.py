"""Low-resolution conditioning for the x4 upscaler: the low-res image, optionally noised.

``ImageConcatWithNoiseAugmentation`` noises the low-res image with its own DDPM forward process
(q_sample at ``noise_level``) and returns the level, which the U-Net receives as a class label.
Its schedule buffers are persistent checkpoint keys (``low_scale_model.*``).
"""
import torch
import torch.nn as nn

from ldm.errors import UserError
from ldm.models.diffusion import schedule
from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule

# The forward-process part of the DDPM schedule (no posterior terms), in registration order.
LOW_SCALE_BUFFERS = schedule.SCHEDULE_BUFFERS[:8]


class AbstractLowScaleModel(nn.Module):
    """A conditioning image concatenated to the latent; ``forward`` returns (image, noise level or None)."""

    def __init__(self, noise_schedule_config=None):
        super().__init__()
        if noise_schedule_config is not None:
            self.register_schedule(**noise_schedule_config)

    def register_schedule(self, beta_schedule="linear", timesteps=1000, linear_start=1e-4, linear_end=2e-2,
                          cosine_s=8e-3):
        betas = make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end,
                                   cosine_s=cosine_s)
        self.num_timesteps = int(betas.shape[0])
        self.linear_start = linear_start
        self.linear_end = linear_end
        buffers = schedule.schedule_buffers(betas)
        for name in LOW_SCALE_BUFFERS:
            self.register_buffer(name, buffers[name])

    def q_sample(self, x_start, t, noise=None):
        """sqrt(alpha_bar_t) x + sqrt(1 - alpha_bar_t) noise."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return schedule.q_sample(x_start, noise, extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape),
                                 extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape))

    def forward(self, x):
        return x, None

    def decode(self, x):
        return x


class SimpleImageConcat(AbstractLowScaleModel):
    """The low-res image as it is, always at noise level 0."""

    def __init__(self):
        super().__init__(noise_schedule_config=None)
        self.max_noise_level = 0

    def forward(self, x):
        return x, torch.zeros(x.shape[0], device=x.device).long()


class ImageConcatWithNoiseAugmentation(AbstractLowScaleModel):
    """Noise the low-res image to ``noise_level`` (random in [0, max_noise_level) when not given).

    ``to_cuda`` is accepted for config compatibility and ignored: buffers follow the module's device.
    """

    def __init__(self, noise_schedule_config, max_noise_level=1000, to_cuda=False):
        super().__init__(noise_schedule_config=noise_schedule_config)
        self.max_noise_level = max_noise_level

    def noise_levels(self, noise_level, batch_size, device):
        """``noise_level`` (int, sequence or tensor) as a long tensor [B], checked against the schedule."""
        if noise_level is None:
            return torch.randint(0, self.max_noise_level, (batch_size,), device=device).long()
        levels = torch.as_tensor(noise_level, device=device)
        if levels.is_floating_point() and not torch.equal(levels, levels.round()):
            raise UserError(f"noise_level must be a whole number, got {levels.tolist()}")
        levels = levels.long().reshape(-1)
        if levels.numel() == 1:
            levels = levels.expand(batch_size).clone()
        if levels.numel() != batch_size:
            raise UserError(f"got {levels.numel()} noise levels for a batch of {batch_size}; pass one per image "
                            f"or a single level")
        highest = min(self.max_noise_level, self.num_timesteps - 1)
        if bool(((levels < 0) | (levels > highest)).any()):
            raise UserError(f"noise_level {levels.tolist()} is out of range; use a level from 0 to {highest}")
        return levels

    def forward(self, x, noise_level=None):
        noise_level = self.noise_levels(noise_level, x.shape[0], x.device)
        return self.q_sample(x, noise_level), noise_level
