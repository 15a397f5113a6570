"""The convolutional encoder/decoder of the first-stage autoencoder (VQGAN/KL-VAE layout)."""
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.attention import attention, xformers_available

logger = logging.getLogger(__name__)


def nonlinearity(x):
    return F.silu(x)


def Normalize(in_channels, num_groups=32):
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


class _Resample(nn.Module):
    """2x resampling, optionally through a 3x3 conv (``conv.*``) of the given stride and padding."""

    def __init__(self, in_channels, with_conv, stride, padding):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=stride, padding=padding)


class Upsample(_Resample):
    def __init__(self, in_channels, with_conv):
        super().__init__(in_channels, with_conv, stride=1, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(_Resample):
    def __init__(self, in_channels, with_conv):
        # Padding is applied asymmetrically in forward (right/bottom only), as trained.
        super().__init__(in_channels, with_conv, stride=2, padding=0)

    def forward(self, x):
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    def __init__(self, *, in_channels, out_channels=None, conv_shortcut=False, dropout, temb_channels=512):
        super().__init__()
        self.in_channels = in_channels
        out_channels = in_channels if out_channels is None else out_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x, temb):
        h = self.conv1(nonlinearity(self.norm1(x)))
        if temb is not None:
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels with 1x1-conv q/k/v/out projections."""

    def __init__(self, in_channels, backend="sdpa"):
        super().__init__()
        self.in_channels = in_channels
        self.attn_backend = backend
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x):
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        # [B, C, H, W] -> [B, 1, HW, C], contiguous (free for a channels_last tensor; from NCHW the
        # reshape alone is a transposed view): one head over all channels. A transposed view would send
        # SDPA on the CPU to its math path, which holds the HW x HW weights: 2.3 GB more at HW = 128^2
        # (a 1024px decode) than the flash kernel.
        q, k, v = (t.permute(0, 2, 3, 1).reshape(b, 1, h * w, c).contiguous() for t in (q, k, v))
        out = attention(q, k, v, backend=self.attn_backend)
        out = out.reshape(b, h, w, c).permute(0, 3, 1, 2)
        return x + self.proj_out(out)


# The official code has a separate xformers class; ours is one class with a backend switch.
MemoryEfficientAttnBlock = AttnBlock


def make_attn(in_channels, attn_type="vanilla", attn_kwargs=None):
    """Attention layer of the VAE; ``vanilla-xformers`` falls back to SDPA without xformers."""
    if attn_type == "vanilla":
        return AttnBlock(in_channels)
    if attn_type == "vanilla-xformers":
        if not xformers_available():
            logger.info("attn_type 'vanilla-xformers' requested without xformers/CUDA: using SDPA attention")
            return AttnBlock(in_channels)
        return AttnBlock(in_channels, backend="xformers")
    if attn_type == "none":
        return nn.Identity()
    raise NotImplementedError(f"attn_type {attn_type!r} is not supported (use vanilla, vanilla-xformers or none)")


def resolution_level(block_in, block_out, num_blocks, with_attn, dropout, attn_type):
    """One resolution of the encoder or decoder: ``block`` (ResNet blocks) and, where the resolution
    has attention, ``attn`` (one after each block). Returns the level and its output width."""
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(), nn.ModuleList()
    for _ in range(num_blocks):
        level.block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, temb_channels=0,
                                       dropout=dropout))
        block_in = block_out
        if with_attn:
            level.attn.append(make_attn(block_in, attn_type=attn_type))
    return level, block_in


def run_level(level, h, temb):
    for i_block, block in enumerate(level.block):
        h = block(h, temb)
        if len(level.attn) > 0:
            h = level.attn[i_block](h)
    return h


class _ResolutionStack(nn.Module):
    """What the encoder and decoder share: their sizes, and the middle (ResNet, attention, ResNet)
    at the lowest resolution."""

    def __init__(self, ch, ch_mult, num_res_blocks, resolution, in_channels, use_linear_attn):
        super().__init__()
        if use_linear_attn:
            raise NotImplementedError("linear attention is not used by any Stable Diffusion VAE")
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels

    def build_middle(self, block_in, dropout, attn_type):
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch,
                                       dropout=dropout)
        self.mid.attn_1 = make_attn(block_in, attn_type=attn_type)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch,
                                       dropout=dropout)

    def run_middle(self, h, temb):
        return self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, temb)), temb)


class Encoder(_ResolutionStack):
    def __init__(self, *, ch, out_ch, ch_mult=(1, 2, 4, 8), num_res_blocks, attn_resolutions, dropout=0.0,
                 resamp_with_conv=True, in_channels, resolution, z_channels, double_z=True, use_linear_attn=False,
                 attn_type="vanilla", **ignore_kwargs):
        super().__init__(ch, ch_mult, num_res_blocks, resolution, in_channels, use_linear_attn)
        self.conv_in = nn.Conv2d(in_channels, self.ch, kernel_size=3, stride=1, padding=1)
        curr_res = resolution
        in_ch_mult = (1,) + tuple(ch_mult)
        self.in_ch_mult = in_ch_mult
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            down, block_in = resolution_level(ch * in_ch_mult[i_level], ch * ch_mult[i_level], self.num_res_blocks,
                                              curr_res in attn_resolutions, dropout, attn_type)
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res = curr_res // 2
            self.down.append(down)
        self.build_middle(block_in, dropout, attn_type)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1,
                                  padding=1)

    def forward(self, x):
        return self.from_features(self.to_features(x))

    # The two halves of forward, apart for tiled encoding (ldm.models.tiled_vae): the levels at
    # image resolution, and what runs at latent resolution (the middle and the output layers).
    def to_features(self, x):
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            h = run_level(down, h, None)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        return h

    def from_features(self, h):
        h = self.run_middle(h, None)
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(_ResolutionStack):
    def __init__(self, *, ch, out_ch, ch_mult=(1, 2, 4, 8), num_res_blocks, attn_resolutions, dropout=0.0,
                 resamp_with_conv=True, in_channels, resolution, z_channels, give_pre_end=False, tanh_out=False,
                 use_linear_attn=False, attn_type="vanilla", **ignorekwargs):
        super().__init__(ch, ch_mult, num_res_blocks, resolution, in_channels, use_linear_attn)
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out

        block_in = ch * ch_mult[self.num_resolutions - 1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.build_middle(block_in, dropout, attn_type)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            up, block_in = resolution_level(block_in, ch * ch_mult[i_level], self.num_res_blocks + 1,
                                            curr_res in attn_resolutions, dropout, attn_type)
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res = curr_res * 2
            self.up.insert(0, up)  # keep checkpoint order: up[0] is the full-resolution level
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z):
        self.last_z_shape = z.shape
        return self.from_features(self.to_features(z))

    # The two halves of forward, apart for tiled decoding (ldm.models.tiled_vae): what runs at
    # latent resolution (conv_in and the middle, whose attention sees every latent pixel), and
    # the upsampling levels with the output layers.
    def to_features(self, z):
        return self.run_middle(self.conv_in(z), None)

    def from_features(self, h):
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            h = run_level(up, h, None)
            if i_level != 0:
                h = up.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(nonlinearity(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h
