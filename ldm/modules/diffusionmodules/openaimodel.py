"""The diffusion U-Net (Dhariwal & Nichol's ADM, with LDM's SpatialTransformer cross-attention).

Parameter names and nesting (``input_blocks.N.M``, ``middle_block``, ``output_blocks``,
``time_embed``, ``label_emb``, ``out``) form the checkpoint keys and are frozen.
"""
from abc import abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.attention import SpatialTransformer, attention
from ldm.modules.diffusionmodules.util import (avg_pool_nd, checkpoint, conv_nd, linear, normalization,
                                               timestep_embedding, zero_module)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x, emb):
        ...


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands each child what it needs: ``emb`` to ResBlocks, ``context`` to transformers."""

    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class _Resample(nn.Module):
    """2x up- or downsampling of ``channels`` to ``out_channels`` (the same by default)."""

    def __init__(self, channels, use_conv, dims, out_channels):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims


class Upsample(_Resample):
    """Nearest-neighbour 2x upsampling (spatial dims only for 3D), optionally followed by a conv."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__(channels, use_conv, dims, out_channels)
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x):
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(_Resample):
    """2x downsampling by a strided conv (``use_conv``) or average pooling."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__(channels, use_conv, dims, out_channels)
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            assert self.channels == self.out_channels
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block with the timestep embedding added (or applied as scale/shift) between the convs."""

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False,
                 use_scale_shift_norm=False, dims=2, use_checkpoint=False, up=False, down=False):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       conv_nd(dims, channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint and self.training)

    def _forward(self, x, emb):
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *((1,) * (h.ndim - emb_out.ndim)))
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the pixels of a feature map (the pre-transformer ADM block)."""

    def __init__(self, channels, num_heads=1, num_head_channels=-1, use_checkpoint=False,
                 use_new_attention_order=False):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            assert channels % num_head_channels == 0, \
                f"q,k,v channels {channels} is not divisible by num_head_channels {num_head_channels}"
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        # The legacy order splits heads before q/k/v; the new order splits q/k/v first.
        self.new_order = use_new_attention_order
        self.attn_backend = "sdpa"
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x):
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint and self.training)

    def _forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))  # [B, 3*C, T]
        heads, ch = self.num_heads, c // self.num_heads
        if self.new_order:
            q, k, v = (t.reshape(b, heads, ch, -1) for t in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b, heads, 3 * ch, -1).split(ch, dim=2)
        # [B, heads, ch, T] -> [B, heads, T, ch]
        out = attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2), backend=self.attn_backend)
        h = out.transpose(-1, -2).reshape(b, c, -1)
        h = self.proj_out(h)
        return (x + h).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """The full U-Net with timestep (and optional class/ADM) embedding and cross-attention.

    Computes in the dtype of its own weights: ``use_fp16``/``use_bf16`` only record what the
    config asked for (the official code casts activations to fp16 even on CPU, where it crashes);
    the loader decides the weight dtype from the device.

    ``forward`` is :meth:`embed`, :meth:`encode` (input blocks and middle block) and :meth:`decode`
    (output blocks), so that variants such as ControlNet's (``cldm.cldm``) can step in between. A
    subclass with ``encoder_only = True`` builds no output blocks. ``skip_channels`` are the
    channels of the input blocks' outputs, the skip connections.
    """

    encoder_only = False

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks,
                 attention_resolutions, dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2,
                 num_classes=None, use_checkpoint=False, use_fp16=False, use_bf16=False, num_heads=-1,
                 num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False,
                 use_new_attention_order=False, use_spatial_transformer=False, transformer_depth=1,
                 context_dim=None, n_embed=None, legacy=True, disable_self_attentions=None,
                 num_attention_blocks=None, disable_middle_self_attn=False, use_linear_in_transformer=False,
                 adm_in_channels=None):
        super().__init__()
        if use_spatial_transformer:
            assert context_dim is not None, "use_spatial_transformer needs context_dim (the cross-attention width)"
        if context_dim is not None:
            assert use_spatial_transformer, "context_dim is only used with use_spatial_transformer: True"
            if not isinstance(context_dim, int):
                context_dim = list(context_dim)
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        if num_heads == -1:
            assert num_head_channels != -1, "either num_heads or num_head_channels has to be set"
        if num_head_channels == -1:
            assert num_heads != -1, "either num_heads or num_head_channels has to be set"

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        if isinstance(num_res_blocks, int):
            self.num_res_blocks = len(channel_mult) * [num_res_blocks]
        else:
            if len(num_res_blocks) != len(channel_mult):
                raise ValueError("num_res_blocks must be an int or have one entry per channel_mult level")
            self.num_res_blocks = list(num_res_blocks)
        if disable_self_attentions is not None:
            assert len(disable_self_attentions) == len(channel_mult)
        if num_attention_blocks is not None:
            assert len(num_attention_blocks) == len(self.num_res_blocks)
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        self.use_bf16 = use_bf16
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.predict_codebook_ids = n_embed is not None

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(linear(model_channels, time_embed_dim), nn.SiLU(),
                                        linear(time_embed_dim, time_embed_dim))
        if num_classes is not None:
            if isinstance(num_classes, int):
                self.label_emb = nn.Embedding(num_classes, time_embed_dim)
            elif num_classes == "continuous":
                self.label_emb = nn.Linear(1, time_embed_dim)
            elif num_classes == "sequential":
                assert adm_in_channels is not None, "num_classes 'sequential' needs adm_in_channels"
                self.label_emb = nn.Sequential(nn.Sequential(
                    linear(adm_in_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim)))
            else:
                raise ValueError(f"num_classes must be an int, 'continuous' or 'sequential', got {num_classes!r}")

        def heads_for(ch):
            """(heads, dim_head) of an attention layer with ``ch`` channels, as the official code picks them."""
            if num_head_channels == -1:
                heads, dim_head = num_heads, ch // num_heads
            else:
                heads, dim_head = ch // num_head_channels, num_head_channels
            if legacy:
                dim_head = ch // heads if use_spatial_transformer else num_head_channels
            return heads, dim_head

        def attention_layer(ch, level, heads_override=None, disable_sa=None):
            heads, dim_head = heads_for(ch)
            if not use_spatial_transformer:
                return AttentionBlock(ch, use_checkpoint=use_checkpoint,
                                      num_heads=heads if heads_override is None else heads_override,
                                      num_head_channels=dim_head, use_new_attention_order=use_new_attention_order)
            if disable_sa is None:
                disable_sa = disable_self_attentions[level] if disable_self_attentions is not None else False
            return SpatialTransformer(ch, heads, dim_head, depth=transformer_depth, context_dim=context_dim,
                                      disable_self_attn=disable_sa, use_linear=use_linear_in_transformer,
                                      use_checkpoint=use_checkpoint)

        def res_block(ch_in, ch_out=None, **kw):
            return ResBlock(ch_in, time_embed_dim, dropout, out_channels=ch_out, dims=dims,
                            use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm, **kw)

        self.input_blocks = nn.ModuleList([
            TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))])
        input_block_chans = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for nr in range(self.num_res_blocks[level]):
                layers = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions and (num_attention_blocks is None or nr < num_attention_blocks[level]):
                    layers.append(attention_layer(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res_block(ch, ch, down=True) if resblock_updown else \
                    Downsample(ch, conv_resample, dims=dims, out_channels=ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch),
            attention_layer(ch, None, disable_sa=disable_middle_self_attn),
            res_block(ch),
        )
        self.skip_channels = tuple(input_block_chans)
        if self.encoder_only:
            return

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(self.num_res_blocks[level] + 1):
                ich = input_block_chans.pop()
                layers = [res_block(ch + ich, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions and (num_attention_blocks is None or i < num_attention_blocks[level]):
                    layers.append(attention_layer(ch, level, heads_override=num_heads_upsample))
                if level and i == self.num_res_blocks[level]:
                    up = res_block(ch, ch, up=True) if resblock_updown else \
                        Upsample(ch, conv_resample, dims=dims, out_channels=ch)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)))
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(normalization(ch), conv_nd(dims, model_channels, n_embed, 1))

    @property
    def dtype(self):
        return self.input_blocks[0][0].weight.dtype

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        """x [B, C, ...], timesteps [B] (int or float), context [B, N, D], y [B] labels or [B, adm] vectors."""
        h, emb, context = self.embed(x, timesteps, context, y)
        h, skips = self.encode(h, emb, context)
        return self.decode(h, skips, emb, context).to(x.dtype)

    def embed(self, x, timesteps, context=None, y=None):
        """(x, timestep [+ class] embedding, context), each in the dtype of the U-Net's weights."""
        assert (y is not None) == (self.num_classes is not None), \
            "must specify y if and only if the model is class-conditional"
        dtype = self.dtype
        t_emb = timestep_embedding(timesteps, self.model_channels, repeat_only=False)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))
        if self.num_classes is not None:
            assert y.shape[0] == x.shape[0]
            emb = emb + self.label_emb(y if y.dtype in (torch.long, torch.int) else y.to(emb.dtype))
        if context is not None:
            context = [c.to(dtype) for c in context] if isinstance(context, list) else context.to(dtype)
        return x.to(dtype), emb.to(dtype), context

    def encode(self, h, emb, context):
        """The input blocks and the middle block: (middle block output, [input block outputs])."""
        skips = []
        for module in self.input_blocks:
            h = module(h, emb, context)
            skips.append(h)
        return self.middle_block(h, emb, context), skips

    def decode(self, h, skips, emb, context):
        """The output blocks, each taking the last remaining skip, then the output layer."""
        skips = list(skips)
        for module in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = module(h, emb, context)
        if self.predict_codebook_ids:
            return self.id_predictor(h)
        return self.out(h)
