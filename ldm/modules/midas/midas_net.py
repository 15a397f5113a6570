"""MiDaS v2.1 depth networks: ``midas_v21`` (ResNeXt-101 32x8d) and ``midas_v21_small`` (EfficientNet-Lite3).

Both are a convolutional encoder read at four strides (4, 8, 16, 32), projected by ``scratch.layerN_rn``
and fused coarse to fine by ``scratch.refinenetN``; the module names follow the MiDaS release files
(``midas_v21-f6b98070.pt``, ``midas_v21_small-70d6b9c8.pt``) so those load as they are. The
encoders are built from torchvision / timm without pretrained weights: the weights come from the
checkpoint.
"""
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.midas.dpt import FeatureFusionBlock, fuse_levels, make_output_head, make_projections


def _encode(pretrained, x):
    l1 = pretrained.layer1(x)
    l2 = pretrained.layer2(l1)
    l3 = pretrained.layer3(l2)
    return l1, l2, l3, pretrained.layer4(l3)


class ResidualConvUnitV21(nn.Module):
    """relu(x) + conv(relu(conv(relu(x)))).

    The v2.1 release applies an in-place ReLU to the unit's input before adding it back, so the skip
    carries relu(x), not x; its weights were trained that way.
    """

    def __init__(self, features):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x):
        x = F.relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x


class MidasNet(nn.Module):
    """``midas_v21``: ResNeXt-101 32x8d encoder, 256-wide decoder. Image [B, 3, H, W] -> [B, H, W]."""

    def __init__(self, features=256, non_negative=True):
        super().__init__()
        from torchvision.models import resnext101_32x8d  # the WSL weights share this architecture
        resnet = resnext101_32x8d(weights=None)
        self.pretrained = nn.Module()
        self.pretrained.layer1 = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1)
        self.pretrained.layer2 = resnet.layer2
        self.pretrained.layer3 = resnet.layer3
        self.pretrained.layer4 = resnet.layer4
        self.scratch = make_projections((256, 512, 1024, 2048), (features,) * 4)
        for level in range(4):
            setattr(self.scratch, f"refinenet{level + 1}", FeatureFusionBlock(features, unit=ResidualConvUnitV21, project=False))
        self.scratch.output_conv = make_output_head(features, 128, non_negative)

    def forward(self, x):
        return fuse_levels(self.scratch, _encode(self.pretrained, x))


class MidasNetSmall(nn.Module):
    """``midas_v21_small``: EfficientNet-Lite3 encoder, decoder widths 512/256/128/64 ("expand").

    Image [B, 3, H, W] -> [B, H, W].
    """

    def __init__(self, features=64, non_negative=True):
        super().__init__()
        import timm
        effnet = timm.create_model("tf_efficientnet_lite3", pretrained=False)
        self.pretrained = nn.Module()
        # timm folds the stem activation into bn1; the Identity keeps the release's module indices
        self.pretrained.layer1 = nn.Sequential(effnet.conv_stem, effnet.bn1, nn.Identity(), *effnet.blocks[0:2])
        self.pretrained.layer2 = nn.Sequential(*effnet.blocks[2:3])
        self.pretrained.layer3 = nn.Sequential(*effnet.blocks[3:5])
        self.pretrained.layer4 = nn.Sequential(*effnet.blocks[5:])
        widths = (features, features * 2, features * 4, features * 8)
        self.scratch = make_projections((32, 48, 136, 384), widths)
        for level, width in enumerate(widths):
            out = width if level == 0 else width // 2
            setattr(self.scratch, f"refinenet{level + 1}", FeatureFusionBlock(width, out))
        self.scratch.output_conv = make_output_head(features, features // 2, non_negative)

    def forward(self, x):
        return fuse_levels(self.scratch, _encode(self.pretrained, x))
