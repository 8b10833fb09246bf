"""The modified 3D U-Net of Isensee et al. 2017, as used by Lemay et al. 2021 for both stages.

Choice: a module written here from torch layers rather than MONAI's DynUNet, so that it follows
the paper's network (as ivadomed implements it) block for block:

* 5 levels, 4 stride-2 convolutions down, base filters ``F`` doubling per level (8 for the cord
  localiser, 16 for the tumour network);
* residual *context modules* at every level: norm, leaky ReLU, conv 3x3x3, dropout (p=0.3), norm,
  leaky ReLU, conv 3x3x3, added to the module's input;
* instance normalisation without affine parameters, leaky ReLU with slope 0.01;
* *upsampling modules* (nearest x2 then conv 3x3x3) and *localisation modules* (conv 3x3x3 then
  conv 1x1x1) on the way up, with skip connections by concatenation;
* deep supervision: 1x1x1 segmentation heads at the two coarser decoder levels, upsampled and
  summed into the full-resolution head.

The network returns logits; a sigmoid per channel gives the probabilities (the classes overlap:
whole tumour contains the other three). Spatial sizes must be multiples of 16.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def _norm_act(channels: int) -> list[nn.Module]:
    return [nn.InstanceNorm3d(channels, affine=False), nn.LeakyReLU(0.01, inplace=False)]


class _ContextModule(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(
            *_norm_act(channels),
            nn.Conv3d(channels, channels, 3, padding=1, bias=False),
            nn.Dropout3d(dropout),
            *_norm_act(channels),
            nn.Conv3d(channels, channels, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _Upsampling(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv3d(in_ch, out_ch, 3, padding=1, bias=False),
            *_norm_act(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _Localisation(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(in_ch, in_ch, 3, padding=1, bias=False),
            *_norm_act(in_ch),
            nn.Conv3d(in_ch, out_ch, 1, bias=False),
            *_norm_act(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ModifiedUNet3D(nn.Module):
    """Modified 3D U-Net (Isensee et al. 2017) with deep supervision; see the module docstring."""

    levels = 5

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_filters: int = 8, dropout: float = 0.3):
        super().__init__()
        f = [base_filters * 2**i for i in range(self.levels)]
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stem = nn.Conv3d(in_channels, f[0], 3, padding=1, bias=False)
        self.down = nn.ModuleList(
            [nn.Identity()] + [nn.Conv3d(f[i - 1], f[i], 3, stride=2, padding=1, bias=False) for i in range(1, 5)]
        )
        self.context = nn.ModuleList([_ContextModule(c, dropout) for c in f])
        self.bottom_norm = nn.Sequential(*_norm_act(f[4]))
        # decoder: level i receives from level i+1
        self.up = nn.ModuleList([_Upsampling(f[i + 1], f[i]) for i in range(4)])
        self.local = nn.ModuleList([_Localisation(2 * f[i], f[i]) for i in range(1, 4)])
        self.final = nn.Sequential(nn.Conv3d(2 * f[0], 2 * f[0], 3, padding=1, bias=False), *_norm_act(2 * f[0]))
        # deep supervision heads at decoder levels 2 and 1 (0-based: 2 is 4x coarser, 1 is 2x)
        self.head2 = nn.Conv3d(f[2], out_channels, 1)
        self.head1 = nn.Conv3d(f[1], out_channels, 1)
        self.head0 = nn.Conv3d(2 * f[0], out_channels, 1)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_stem(self.stem(x))

    def from_stem(self, stem: torch.Tensor) -> torch.Tensor:
        """Everything after the first convolution (its output ``stem``): the click-guided network
        adds its click channels' share of a widened first convolution there."""
        # unrolled over the fixed 5 levels so that torch.jit.script and ONNX export see plain code
        s0 = self.context[0](stem)
        s1 = self.context[1](self.down[1](s0))
        s2 = self.context[2](self.down[2](s1))
        s3 = self.context[3](self.down[3](s2))
        h = self.bottom_norm(self.context[4](self.down[4](s3)))
        h = self.local[2](torch.cat([s3, self.up[3](h)], dim=1))  # level 3
        h = self.local[1](torch.cat([s2, self.up[2](h)], dim=1))  # level 2
        ds = self.head2(h)
        h = self.local[0](torch.cat([s1, self.up[1](h)], dim=1))  # level 1
        ds = self.upsample(ds) + self.head1(h)
        h = self.final(torch.cat([s0, self.up[0](h)], dim=1))  # level 0
        return self.head0(h) + self.upsample(ds)


class PatchNormalised(nn.Module):
    """Wraps a network so that every input patch is z-scored per channel before the forward pass.

    Lemay et al. normalise stage-2 inputs per patch; putting it in the module makes training
    patches, sliding-window inference and exported models all normalise the same way.

    The input may carry one channel more than the network takes: a validity mask (1 where the
    voxel belongs to the image, 0 where it is padding; :mod:`imsct.windows`). The mean and
    standard deviation are then taken over the valid voxels only and the mask is dropped; with a
    mask of ones the result is exactly the unmasked z-score.
    """

    def __init__(self, net: nn.Module, eps: float = 1e-5):
        super().__init__()
        self.net = net
        self.eps = eps
        self.in_channels = int(getattr(net, "in_channels", 0))
        self.accepts_validity = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == self.in_channels + 1:
            return self.net(zscore_patch(x[:, :-1], x[:, -1:], self.eps))
        return self.net(zscore_patch(x, None, self.eps))


def zscore_patch(x: torch.Tensor, valid: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """Per-patch, per-channel z-score of ``x`` (B, C, ...); with a validity mask ``valid`` (B, 1, ...)
    the mean and standard deviation come from the valid voxels only (:mod:`imsct.windows`)."""
    if valid is not None:
        v = (valid > 0.5).to(x.dtype)
        n = v.sum(dim=(2, 3, 4), keepdim=True).clamp(min=1.0)
        mean = (x * v).sum(dim=(2, 3, 4), keepdim=True) / n
        var = (((x - mean) * v) ** 2).sum(dim=(2, 3, 4), keepdim=True) / (n - 1.0).clamp(min=1.0)
        std = torch.sqrt(var)
    else:
        mean = x.mean(dim=(2, 3, 4), keepdim=True)
        std = x.std(dim=(2, 3, 4), keepdim=True)
    return (x - mean) / (std + eps)


class ClickGuided(nn.Module):
    """The stage-2 network with click channels (interactive correction, :mod:`imsct.clicks`).

    Input: the image channels (T2w, T1w), then the click maps (one per click class: tumor, edema,
    cavity, background), then optionally the validity channel. Only the image channels are
    z-scored per patch (as :class:`PatchNormalised` does, over valid voxels); click maps enter as
    they are (values in [0, 1]).

    The first convolution is widened for the click channels: its image part is ``net.stem`` (the
    stage-2 weights) and its click part is ``click_stem``, zero at initialisation, so that a network
    made by :meth:`from_stage2` answers exactly as stage 2 does whatever the clicks (the sum of two
    convolutions over disjoint channels is one convolution over all of them; held as two tensors so
    that training can give the new weights their own learning rate).
    """

    def __init__(self, net: "ModifiedUNet3D", image_channels: int = 2, click_channels: int = 4, eps: float = 1e-5):
        super().__init__()
        if int(net.in_channels) != image_channels:
            raise ValueError(f"network takes {net.in_channels} channels, expected the {image_channels} image channels")
        self.net = net
        self.image_channels, self.click_channels = int(image_channels), int(click_channels)
        self.in_channels = self.image_channels + self.click_channels
        self.eps = eps
        self.accepts_validity = True
        self.click_stem = nn.Conv3d(click_channels, net.stem.out_channels, 3, padding=1, bias=False)
        nn.init.zeros_(self.click_stem.weight)

    @classmethod
    def from_stage2(cls, stage2: "PatchNormalised", click_channels: int = 4) -> "ClickGuided":
        """A click-guided network that starts as ``stage2`` (a :class:`PatchNormalised` U-Net): same
        weights, zero click weights."""
        import copy

        return cls(copy.deepcopy(stage2.net), int(stage2.in_channels), click_channels, stage2.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ic = self.image_channels
        clicks = x[:, ic:ic + self.click_channels]
        if x.shape[1] == self.in_channels + 1:
            image = zscore_patch(x[:, :ic], x[:, -1:], self.eps)
        else:
            image = zscore_patch(x[:, :ic], None, self.eps)
        return self.net.from_stem(self.net.stem(image) + self.click_stem(clicks))


def localiser(**kw) -> ModifiedUNet3D:
    """Stage 1: T2w in, cord region out; 8 base filters."""
    return ModifiedUNet3D(in_channels=1, out_channels=1, base_filters=8, **kw)


def tumor_network(**kw) -> PatchNormalised:
    """Stage 2: [T2w, T1w] in, [tumour, edema, cavity, whole tumour] out; 16 base filters."""
    return PatchNormalised(ModifiedUNet3D(in_channels=2, out_channels=4, base_filters=16, **kw))


def anatomy_network(**kw) -> PatchNormalised:
    """Stage 3: T2w in, [tight cord, intervertebral discs] out; 8 base filters, z-scored per patch
    like stage 2 (it runs on stage 2's box with the same windows)."""
    return PatchNormalised(ModifiedUNet3D(in_channels=1, out_channels=2, base_filters=8, **kw))


def click_network(**kw) -> ClickGuided:
    """Interactive correction: [T2w, T1w, clicks tumor, edema, cavity, background] in, stage 2's
    four outputs out; the stage-2 U-Net (16 base filters) with a widened first convolution."""
    return ClickGuided(ModifiedUNet3D(in_channels=2, out_channels=4, base_filters=16, **kw), image_channels=2, click_channels=4)
