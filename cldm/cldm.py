"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of the U-Net's encoder reads the latent plus a hint image (edges, depth, pose, ...)
and hands the locked U-Net one residual per skip connection and one for the middle block, each
through a zero-initialised 1x1 convolution (eq. 2 of the paper):

    y_c = F(x; Θ) + Z(F(x + Z(c; Θz1); Θc); Θz2)

    F(.; Θ)    a block of the locked U-Net        F(.; Θc)   its trainable copy (``control_model``)
    Z(.; Θz)   a zero convolution (``zero_convs``, ``middle_block_out``)
    c          the hint encoded to latent size (``input_hint_block``, whose last conv is zero too)

At initialisation every Z is zero, so the controlled U-Net's output is the plain U-Net's exactly.
Class, parameter and key names are those of lllyasviel/ControlNet (``cldm/cldm.py``) and
ControlNet-v1-1-nightly (``global_average_pooling``), whose configs name these classes.
"""
import torch
from torch import nn

from cldm.control import ControlHint, control_inputs
from cldm.training import ControlTrainingMixin
from ldm.errors import UserError
from ldm.models.diffusion.latent_diffusion import LatentDiffusion
from ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential, UNetModel
from ldm.modules.diffusionmodules.util import conv_nd, zero_module
from ldm.modules.partial_conditioning import fill_rows
from ldm.util import instantiate_from_config

# Widths of the hint encoder's 3x3 convs before its last one; the convs at STRIDED step down 2x
# each, from the hint's pixel resolution to the latent's (SD's autoencoder downsamples 8x).
HINT_WIDTHS = (16, 16, 32, 32, 96, 96, 256)
HINT_STRIDED = (2, 4, 6)
# Guess mode weights residual i of SD's 13 by 0.825 ** (12 - i): the middle block's at full
# strength, the first skip's at ~0.1 (the released demos' constant).
GUESS_MODE_DECAY = 0.825


def control_scales(strength=1.0, guess_mode=False, count=13):
    """``ControlLDM.control_scales`` for a control strength: all ``strength``, or in guess mode
    ``strength * 0.825 ** (count - 1 - i)`` for residual i (the last is the middle block's)."""
    if not guess_mode:
        return [float(strength)] * count
    return [float(strength) * GUESS_MODE_DECAY ** float(count - 1 - i) for i in range(count)]


def hint_encoder(dims, hint_channels, model_channels):
    """Hint [B, hint_channels, 8h, 8w] -> [B, model_channels, h, w]: convs with SiLU between, the last zero."""
    layers, width = [], hint_channels
    for i, out in enumerate(HINT_WIDTHS):
        stride = 2 if i in HINT_STRIDED else 1
        layers += [conv_nd(dims, width, out, 3, padding=1, stride=stride), nn.SiLU()]
        width = out
    layers.append(zero_module(conv_nd(dims, width, model_channels, 3, padding=1)))
    return TimestepEmbedSequential(*layers)


def zero_conv(dims, channels):
    return TimestepEmbedSequential(zero_module(conv_nd(dims, channels, channels, 1, padding=0)))


class ControlledUnetModel(UNetModel):
    """The locked U-Net; ``control`` (one residual per skip connection, then the middle block's) is
    added to the middle block's output and, unless ``only_mid_control``, to the skip connections.

    The released code runs the encoder under ``torch.no_grad``, since it leaves the locked weights
    requiring grad and just does not optimise them. Here the encoder runs with autograd as usual:
    a trainer freezes the locked weights, which keeps the encoder out of the graph all the same,
    and gradients with respect to the inputs still flow.
    """

    def forward(self, x, timesteps=None, context=None, control=None, only_mid_control=False, y=None, **kwargs):
        h, emb, context = self.embed(x, timesteps, context, y)
        h, skips = self.encode(h, emb, context)
        if control is not None:
            if len(control) != len(skips) + 1:
                raise ValueError(f"{len(control)} control residuals for a U-Net with {len(skips)} skip "
                                 f"connections and a middle block")
            *skip_control, mid_control = [c.to(h.dtype) for c in control]
            h = h + mid_control
            if not only_mid_control:
                skips = [skip + c for skip, c in zip(skips, skip_control)]
        return self.decode(h, skips, emb, context).to(x.dtype)


class ControlNet(UNetModel):
    """The trainable copy: the U-Net's ``time_embed``, ``input_blocks`` and ``middle_block``, plus
    ``input_hint_block``, ``zero_convs`` (one per input block) and ``middle_block_out``.

    Takes the U-Net's parameters with ``hint_channels`` (the hint image's) instead of ``out_channels``.
    """

    encoder_only = True

    def __init__(self, image_size, in_channels, model_channels, hint_channels, num_res_blocks,
                 attention_resolutions, dims=2, **unet_params):
        super().__init__(image_size, in_channels, model_channels, None, num_res_blocks, attention_resolutions,
                         dims=dims, **unet_params)
        self.dims = dims
        self.input_hint_block = hint_encoder(dims, hint_channels, model_channels)
        self.zero_convs = nn.ModuleList([zero_conv(dims, ch) for ch in self.skip_channels])
        self.middle_block_out = zero_conv(dims, self.skip_channels[-1])

    @property
    def num_residuals(self):
        return len(self.zero_convs) + 1

    @property
    def hint_factor(self):
        """Hint pixels per latent pixel: the hint encoder's stride-2 convs step down this much."""
        return 2 ** len(HINT_STRIDED)

    def forward(self, x, hint, timesteps, context=None, y=None, **kwargs):
        """Residuals [input block 0, ..., input block N-1, middle block] for the latent ``x`` and
        the hint [B, hint_channels, 8H, 8W] (pixel resolution for SD, values in [0, 1])."""
        h, emb, context = self.embed(x, timesteps, context, y)
        guided_hint = self.input_hint_block(hint.to(h.dtype), emb, context)
        residuals = []
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:  # the encoded hint joins right after the U-Net's input conv
                h = h + guided_hint
            residuals.append(zero(h, emb, context))
        h = self.middle_block(h, emb, context)
        residuals.append(self.middle_block_out(h, emb, context))
        return residuals


def _check_scales(scales, control_model):
    if len(scales) != control_model.num_residuals:
        raise UserError(f"control_scales has {len(scales)} values but this ControlNet gives "
                        f"{control_model.num_residuals} residuals; give one scale per residual")


class ControlLDM(ControlTrainingMixin, LatentDiffusion):
    """Latent diffusion whose U-Net (a ``ControlledUnetModel``) is steered by ``control_model``.

    The conditioning is a dict: ``c_crossattn`` [text context] and ``c_concat`` [hint] (None: no
    control, the plain U-Net), or a list of ``cldm.control.ControlHint`` for several ControlNets
    with their own weights and step ranges. ``control_scales`` weight the residuals of a plain
    ``[hint]`` (one per residual: 13 for SD, see :func:`control_scales`); ``only_mid_control`` adds
    only the middle block's; ``global_average_pooling`` (ControlNet 1.1 shuffle) averages each residual over its pixels;
    ``sd_locked`` False also trains the U-Net's decoder (:meth:`trainable_parameters`). Training through
    main.py: ``cldm.training``.
    """

    def __init__(self, control_stage_config, control_key, only_mid_control, *args, global_average_pooling=False,
                 sd_locked=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.control_model = instantiate_from_config(control_stage_config)
        self.control_key = control_key
        self.only_mid_control = only_mid_control
        self.global_average_pooling = global_average_pooling
        self.sd_locked = sd_locked
        self.control_scales = control_scales(1.0, count=self.control_model.num_residuals)
        if not self.learn_logvar:
            # ControlNet's copy of ddpm.py saves logvar, so its checkpoints hold the key
            self.register_buffer("logvar", self.logvar, persistent=True)

    def apply_model(self, x_noisy, t, cond, *args, **kwargs):
        if not isinstance(cond, dict):  # text conditioning alone: no control
            cond = {"c_crossattn": cond if isinstance(cond, list) else [cond]}
        context = torch.cat(cond["c_crossattn"], 1)
        control = self.summed_control(x_noisy, t, context, cond.get("c_concat"))
        return self.model.diffusion_model(x_noisy, t, context=context, control=control,
                                          only_mid_control=self.only_mid_control)

    def summed_control(self, x_noisy, t, context, c_concat):
        """The residuals of every ControlNet input in ``c_concat`` (see ``cldm.control``), summed; each
        only on the rows it conditions (zero on the others). None when no input acts."""
        total = None
        for entry, rows in control_inputs(c_concat):
            if isinstance(entry, list):   # lllyasviel/ControlNet's [hint]: our control_model at control_scales
                entry = ControlHint(torch.cat(entry, 1), tuple(self.control_scales))
            net = self.control_model if entry.control_model is None else entry.control_model
            _check_scales(entry.scales, net)
            if not any(entry.scales):
                continue   # weight 0 contributes nothing: the U-Net's output stays exactly the plain one
            part = slice(None) if rows is None else rows
            residuals = self.control_residuals(x_noisy[part], t[part], context[part], entry.hint, net,
                                               entry.scales, entry.global_average_pooling)
            residuals = [fill_rows(r, rows, x_noisy.shape[0]) for r in residuals]
            total = residuals if total is None else [a + b for a, b in zip(total, residuals)]
        return total

    def control_residuals(self, x_noisy, t, context, hint, control_model=None, scales=None,
                          global_average_pooling=None):
        """The residuals of ``control_model`` (default: ours) for ``hint``, weighted by ``scales``
        (default: ``control_scales``) and pooled with ``global_average_pooling`` (default: ours)."""
        net = self.control_model if control_model is None else control_model
        scales = self.control_scales if scales is None else scales
        pool = self.global_average_pooling if global_average_pooling is None else global_average_pooling
        _check_scales(scales, net)
        wanted = [side * net.hint_factor for side in x_noisy.shape[2:]]
        if list(hint.shape[2:]) != wanted:
            raise UserError(f"the hint is {hint.shape[-1]}x{hint.shape[-2]} pixels but this latent needs "
                            f"{wanted[-1]}x{wanted[-2]} ({net.hint_factor}x its size); resize the hint")
        if hint.shape[0] == 1 and x_noisy.shape[0] > 1:   # one hint for the whole batch
            hint = hint.expand(x_noisy.shape[0], *hint.shape[1:])
        residuals = net(x=x_noisy, hint=hint.to(x_noisy.device), timesteps=t, context=context)
        residuals = [r * scale for r, scale in zip(residuals, scales)]
        if pool:
            residuals = [r.mean(dim=(2, 3), keepdim=True) for r in residuals]
        return residuals

    def trainable_parameters(self):
        """What ControlNet training optimises: the control model, plus with ``sd_locked`` False the
        U-Net's output blocks and output layer (as the released ``configure_optimizers``)."""
        params = list(self.control_model.parameters())
        if not self.sd_locked:
            unet = self.model.diffusion_model
            params += list(unet.output_blocks.parameters()) + list(unet.out.parameters())
        return params
