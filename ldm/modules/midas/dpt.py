"""DPT monocular depth (Ranftl et al. 2021, "Vision Transformers for Dense Prediction"), MiDaS weights.

A timm ViT (optionally with a ResNet-50 stem, "hybrid") is read out at four depths; each token
sequence is reassembled into a feature map, and a RefineNet-style decoder fuses them from coarse
to fine into a relative inverse-depth map at the input resolution.

Module names are MiDaS's, so MiDaS checkpoints and the SD depth checkpoint's ``depth_model.model.*``
keys load as they are: ``pretrained.model`` (the timm ViT), ``pretrained.act_postprocess{1..4}``
(reassembly), ``scratch.layer{1..4}_rn``, ``scratch.refinenet{1..4}``, ``scratch.output_conv``.
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

# backbone name -> (timm model, readout depths, reassembled channels, ViT width, hybrid)
BACKBONES = {
    "vitb_rn50_384": ("vit_base_r50_s16_384", (0, 1, 8, 11), (256, 512, 768, 768), 768, True),
    "vitl16_384": ("vit_large_patch16_384", (5, 11, 17, 23), (256, 512, 1024, 1024), 1024, False),
    "vitb16_384": ("vit_base_patch16_384", (2, 5, 8, 11), (96, 192, 384, 768), 768, False),
}
PATCH = 16


class ProjectReadout(nn.Module):
    """Fold the class token into every patch token: Linear(GELU) of [token, cls]."""

    def __init__(self, in_features, start_index=1):
        super().__init__()
        self.start_index = start_index
        self.project = nn.Sequential(nn.Linear(2 * in_features, in_features), nn.GELU())

    def forward(self, x):
        tokens = x[:, self.start_index:]
        readout = x[:, :1].expand_as(tokens)
        return self.project(torch.cat((tokens, readout), -1))


class AddReadout(nn.Module):
    def __init__(self, start_index=1):
        super().__init__()
        self.start_index = start_index

    def forward(self, x):
        readout = (x[:, 0] + x[:, 1]) / 2 if self.start_index == 2 else x[:, 0]
        return x[:, self.start_index:] + readout.unsqueeze(1)


class Slice(nn.Module):
    def __init__(self, start_index=1):
        super().__init__()
        self.start_index = start_index

    def forward(self, x):
        return x[:, self.start_index:]


def make_readout(kind, vit_features, start_index=1):
    if kind == "project":
        return ProjectReadout(vit_features, start_index)
    if kind == "add":
        return AddReadout(start_index)
    if kind == "ignore":
        return Slice(start_index)
    raise ValueError(f"readout must be 'ignore', 'add' or 'project', got {kind!r}")


class Reassemble(nn.Sequential):
    """Tokens [B, 1+N, D] -> feature map [B, C, h, w] at a chosen scale.

    Index 0 is the readout, 1 and 2 are the slots of MiDaS's transpose/unflatten (no weights; the
    reshape happens in ``forward`` at the actual grid size), 3 on are the resampling convs.
    """

    def __init__(self, readout, *convs):
        super().__init__(readout, nn.Identity(), nn.Identity(), *convs)

    def forward(self, tokens, grid):
        x = self[0](tokens)  # [B, N, D]
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)  # [B, D, h, w]
        for layer in list(self)[3:]:
            x = layer(x)
        return x


def make_reassemble(level, readout, vit_features, channels):
    project = nn.Conv2d(vit_features, channels, kernel_size=1)
    if level == 0:  # 4x up
        return Reassemble(readout, project, nn.ConvTranspose2d(channels, channels, kernel_size=4, stride=4))
    if level == 1:  # 2x up
        return Reassemble(readout, project, nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2))
    if level == 2:
        return Reassemble(readout, project)
    return Reassemble(readout, project, nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1))


def build_vit(timm_name, **timm_kwargs):
    import timm  # deferred: importing timm takes seconds
    return timm.create_model(timm_name, pretrained=False, **timm_kwargs)


def build_hybrid_vit(img_size=384, embed_dim=768, depth=12, num_heads=12, num_classes=1000, **vit_kwargs):
    """timm's ``vit_base_r50_s16_384``: a ResNet-50 (first three stages, stride 16) under a ViT-B/16.

    Assembled here, with the same classes and arguments as timm's factory, so that the ResNet's
    output grid can be given instead of measured by a dummy forward pass (which cannot run while
    parameters sit on the meta device).
    """
    from timm.layers import HybridEmbed, StdConv2dSame
    from timm.models.resnetv2 import ResNetV2
    from timm.models.vision_transformer import VisionTransformer

    class KnownGridHybridEmbed(HybridEmbed):
        def _init_backbone(self, **kwargs):
            return super()._init_backbone(**dict(kwargs, feature_dim=self.backbone.num_features))

    backbone = ResNetV2(layers=(3, 4, 9), num_classes=0, global_pool="", in_chans=3, preact=False, stem_type="same",
                        conv_layer=partial(StdConv2dSame, eps=1e-8))
    embed = partial(KnownGridHybridEmbed, backbone=backbone, feature_size=img_size // PATCH, feature_ratio=PATCH)
    return VisionTransformer(img_size=img_size, patch_size=1, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                             num_classes=num_classes, embed_layer=embed, **vit_kwargs)


class ViTEncoder(nn.Module):
    """The timm ViT (``model``) and the four reassembly heads; ``forward`` gives four feature maps.

    Positional embeddings are resized bilinearly to the input's patch grid, so any size that is a
    multiple of 32 works. For the hybrid backbone the first two maps are ResNet stage outputs.
    """

    def __init__(self, timm_name, hooks, features, vit_features, hybrid, readout="project", start_index=1,
                 **timm_kwargs):
        super().__init__()
        self.model = build_hybrid_vit(**timm_kwargs) if hybrid else build_vit(timm_name, **timm_kwargs)
        self.hooks = tuple(hooks)
        self.hybrid = hybrid
        self.start_index = start_index
        levels = range(2 if hybrid else 0, 4)  # the feature levels read out of the ViT
        self.block_to_level = {self.hooks[level]: level for level in levels}
        for level in levels:
            setattr(self, f"act_postprocess{level + 1}",
                    make_reassemble(level, make_readout(readout, vit_features, start_index), vit_features,
                                    features[level]))

    def resized_pos_embed(self, grid):
        """The class-token embedding and the grid embeddings resized to ``grid`` (h, w): [1, 1+h*w, D]."""
        pos = self.model.pos_embed
        tok, old = pos[:, :self.start_index], pos[0, self.start_index:]
        side = int(math.sqrt(len(old)))
        old = old.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        new = F.interpolate(old, size=grid, mode="bilinear")
        new = new.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
        return torch.cat([tok, new], dim=1)

    def forward(self, x):
        vit = self.model
        grid = (x.shape[2] // PATCH, x.shape[3] // PATCH)
        maps = []
        if self.hybrid:
            backbone = vit.patch_embed.backbone
            x = backbone.stem(x)
            for i, stage in enumerate(backbone.stages):
                x = stage(x)
                if i < 2:
                    maps.append(x)
            x = backbone.forward_head(backbone.norm(x))
        x = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [B, h*w, D]
        x = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = vit.pos_drop(x + self.resized_pos_embed(grid))
        for i, block in enumerate(vit.blocks[:max(self.block_to_level) + 1]):
            x = block(x)
            if i in self.block_to_level:
                maps.append(getattr(self, f"act_postprocess{self.block_to_level[i] + 1}")(x, grid))
        return maps


class ResidualConvUnit(nn.Module):
    """x + conv(relu(conv(relu(x))))."""

    def __init__(self, features):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class FeatureFusionBlock(nn.Module):
    """Add the skip (after a residual unit), refine, upsample 2x, project (to ``out_features``).

    The v2.1 ResNeXt net uses its own residual ``unit`` and has no projection (``project=False``).
    """

    def __init__(self, features, out_features=None, unit=ResidualConvUnit, project=True):
        super().__init__()
        self.out_conv = nn.Conv2d(features, out_features or features, kernel_size=1) if project else nn.Identity()
        self.resConfUnit1 = unit(features)
        self.resConfUnit2 = unit(features)

    def forward(self, x, skip=None):
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Interpolate(nn.Module):
    def __init__(self, scale_factor, mode, align_corners=False):
        super().__init__()
        self.scale_factor = scale_factor
        self.mode = mode
        self.align_corners = align_corners

    def forward(self, x):
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode, align_corners=self.align_corners)


class DPTDepthModel(nn.Module):
    """Image [B, 3, H, W] (MiDaS-normalised, H and W multiples of 32) -> inverse depth [B, H, W].

    ``backbone`` is a MiDaS backbone name (see BACKBONES); ``hooks`` and ``timm_kwargs`` override the
    readout depths and timm hyper-parameters (tiny test models).
    """

    def __init__(self, backbone="vitb_rn50_384", features=256, readout="project", non_negative=True, hooks=None,
                 **timm_kwargs):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}")
        timm_name, default_hooks, channels, vit_features, hybrid = BACKBONES[backbone]
        vit_features = timm_kwargs.get("embed_dim", vit_features)
        self.pretrained = ViTEncoder(timm_name, hooks or default_hooks, channels, vit_features, hybrid, readout,
                                     **timm_kwargs)
        self.scratch = make_projections(channels, (features,) * 4)
        for level in range(4):
            setattr(self.scratch, f"refinenet{level + 1}", FeatureFusionBlock(features))
        self.scratch.output_conv = make_output_head(features, features // 2, non_negative, align_corners=True)

    def forward(self, x):
        return fuse_levels(self.scratch, self.pretrained(x))


def make_projections(in_channels, out_channels):
    """The decoder's ``scratch`` module holding ``layerN_rn``: 3x3 convolutions, no bias, from each
    encoder level to the decoder's width there."""
    scratch = nn.Module()
    for level, (width, out) in enumerate(zip(in_channels, out_channels)):
        setattr(scratch, f"layer{level + 1}_rn", nn.Conv2d(width, out, kernel_size=3, padding=1, bias=False))
    return scratch


def make_output_head(features, hidden, non_negative, align_corners=False):
    """``scratch.output_conv``: conv, 2x bilinear upsampling, conv, ReLU, 1-channel conv, ReLU when
    depth is ``non_negative``. DPT upsamples with aligned corners, the v2.1 nets without."""
    return nn.Sequential(
        nn.Conv2d(features, hidden, kernel_size=3, padding=1),
        Interpolate(scale_factor=2, mode="bilinear", align_corners=align_corners),
        nn.Conv2d(hidden, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 1, kernel_size=1),
        nn.ReLU() if non_negative else nn.Identity(),
        nn.Identity(),
    )


def fuse_levels(scratch, levels):
    """The MiDaS decoder: encoder maps at strides 4, 8, 16, 32 -> inverse depth [B, H, W].

    Each level is projected (``layerN_rn``) and fused coarse to fine (``refinenetN``), then
    ``output_conv`` upsamples to the input size.
    """
    l1, l2, l3, l4 = levels
    path = scratch.refinenet4(scratch.layer4_rn(l4))
    path = scratch.refinenet3(path, scratch.layer3_rn(l3))
    path = scratch.refinenet2(path, scratch.layer2_rn(l2))
    path = scratch.refinenet1(path, scratch.layer1_rn(l1))
    return scratch.output_conv(path).squeeze(dim=1)
