"""Training a ControlNet through main.py, as lllyasviel/ControlNet's ``tutorial_train.py`` does.

Batches carry the hint under ``control_key`` ([B, H, W, C] in [0, 1] at pixel resolution); the
conditioning becomes ``{"c_crossattn": [text], "c_concat": [hint]}``. Only the ControlNet trains
(plus the U-Net's decoder with ``sd_locked`` False): everything else is frozen before the optimizer
is built, so the locked U-Net's weights get no gradients.

Initialisation follows ``tool_add_control.py``: every ``control_model.X`` tensor starts as the base
U-Net's ``model.diffusion_model.X`` where that exists with the same shape (the encoder, middle block
and time embedding), and keeps its fresh initialisation otherwise (the hint encoder and the zero
convolutions). :func:`control_init_state_dict` does it for ``scripts/tool_add_control.py``, and
``model.params.ckpt_path`` given a plain SD checkpoint does it on loading.
"""
import logging

import torch

from cldm.loading import PREFIX as CONTROL_PREFIX
from cldm.loading import UNET_PREFIX
from ldm.models.diffusion.ddpm_base import DDPM

log = logging.getLogger(__name__)


def control_init_state_dict(base, own):
    """(state dict, copied, fresh): ``own`` (a ControlLDM's state dict) with the tensors of ``base`` (an
    SD checkpoint's) in it, and each ControlNet tensor copied from the base U-Net's of the same name;
    ``copied`` and ``fresh`` count the ControlNet tensors taken from the U-Net and left as initialised."""
    merged, copied, fresh = {}, 0, 0
    for key, value in own.items():
        source = UNET_PREFIX + key[len(CONTROL_PREFIX):] if key.startswith(CONTROL_PREFIX) else key
        theirs = base.get(source)
        if theirs is not None and tuple(theirs.shape) == tuple(value.shape):
            merged[key] = theirs.to(value.dtype)
            copied += key.startswith(CONTROL_PREFIX)
        else:
            merged[key] = value
            fresh += key.startswith(CONTROL_PREFIX)
    return merged, copied, fresh


class ControlTrainingMixin:
    """For ``ControlLDM``: batches with hints, the locked U-Net frozen, tool_add_control initialisation."""

    def adapt_init_state_dict(self, sd):
        if any(key.startswith(CONTROL_PREFIX) for key in sd):
            return sd
        merged, copied, fresh = control_init_state_dict(sd, self.state_dict())
        log.info("ControlNet initialised from the base U-Net: %d tensors copied, %d new (hint encoder, "
                 "zero convolutions)", copied, fresh)
        return merged

    def hint_input(self, batch, bs=None):
        """``batch[control_key]`` as float [B, C, H, W] on the model's device."""
        hint = DDPM.get_input(self, batch, self.control_key)
        return hint[:bs].to(self.device)

    @torch.no_grad()
    def get_input(self, batch, k, bs=None, return_first_stage_outputs=False, force_c_encode=False,
                  return_original_cond=False, **kwargs):
        """(z, {"c_crossattn": [text], "c_concat": [hint]}), plus x, reconstruction and raw text on request."""
        z, c, *rest = super().get_input(batch, k, bs=bs, return_first_stage_outputs=return_first_stage_outputs,
                                        force_c_encode=force_c_encode, return_original_cond=return_original_cond,
                                        **kwargs)
        cond = {"c_crossattn": [c], "c_concat": [self.hint_input(batch, bs)]}
        return (z, cond, *rest)

    def forward(self, x, c, *args, **kwargs):
        if self.cond_stage_trainable:
            c = {**c, "c_crossattn": [self.get_learned_conditioning(text) for text in c["c_crossattn"]]}
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=self.device).long()
        return self.p_losses(x, c, t, *args, **kwargs)

    def configure_optimizers(self):
        trainable = {id(p) for p in self.trainable_parameters()}
        for p in self.parameters():
            p.requires_grad_(id(p) in trainable)
        return super().configure_optimizers()

    @torch.no_grad()
    def log_images(self, batch, N=8, **kwargs):
        """The LatentDiffusion panels, sampled with the batch's hints, and the hints as ``control``."""
        log = super().log_images(batch, N=N, **kwargs)
        log["control"] = self.hint_input(batch, N) * 2.0 - 1.0
        return log


def write_control_init(base_path, config_path, out_path, *, overwrite=False, trust_config=False):
    """``tool_add_control.py``: write to ``out_path`` the ControlLDM of ``config_path`` with the weights of
    the SD checkpoint ``base_path`` and its ControlNet initialised from the base U-Net; a ``.ckpt``
    (``{"state_dict": ...}``) or ``.safetensors`` file to give main.py as ``model.params.ckpt_path``.
    Returns (copied, fresh), as :func:`control_init_state_dict` counts them."""
    from pathlib import Path

    from ldm.checkpoint import load_config, read_state_dict
    from ldm.config_safety import trusting_configs
    from ldm.errors import UserError
    from ldm.util import instantiate_from_config

    out_path = Path(out_path)
    if out_path.suffix not in (".ckpt", ".safetensors"):
        raise UserError(f"output '{out_path}' must end in .ckpt or .safetensors")
    if out_path.exists() and not overwrite:
        raise UserError(f"output '{out_path}' already exists; pass --force to replace it")
    config = load_config(config_path, trust_config=trust_config)
    params = config.model.get("params") or {}
    if params.get("control_stage_config") is None:
        raise UserError(f"config '{config_path}' builds no ControlNet (no control_stage_config); use a ControlNet "
                        f"config such as configs/controlnet/cldm_v15.yaml")
    params.pop("ckpt_path", None)
    base = read_state_dict(base_path)
    if any(key.startswith(CONTROL_PREFIX) for key in base):
        raise UserError(f"'{base_path}' already holds a ControlNet (control_model.*); give the plain SD checkpoint")
    with trusting_configs(trust_config):
        model = instantiate_from_config(config.model)
    own = model.state_dict()
    unet = [k for k in own if k.startswith(UNET_PREFIX)]
    unfit = [k for k in unet if k not in base or tuple(base[k].shape) != tuple(own[k].shape)]
    if unfit:
        raise UserError(f"'{base_path}' does not fit config '{config_path}': {len(unfit)} of its {len(unet)} U-Net "
                        f"tensors are missing or shaped differently (e.g. {unfit[0]}); give the config of that "
                        f"model's generation")
    merged, copied, fresh = control_init_state_dict(base, own)
    merged = {k: v.contiguous() for k, v in merged.items()}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(merged, str(out_path))
    else:
        torch.save({"state_dict": merged}, out_path)
    return copied, fresh
