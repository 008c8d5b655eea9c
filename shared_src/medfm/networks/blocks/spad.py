"""Spacing-adaptive (SPAD) convolutions: one set of 3D weights for 2D images and 3D volumes of any spacing.

Tensors are channel-first ``(N, C, D, H, W)`` with ``D`` the through-plane axis (the two equal spacings are
in-plane, see :func:`medfm.transforms.spad.ReorientToDepthd`). A 2D image is a volume of depth 1.

A sample's anisotropy level is ``aniso_d = floor(log2(clip(s_z / min(s_x, s_y), 1, 2**MAX_ANISO_D)))``;
2D images get ``MAX_ANISO_D``. Every stride-2 stage halves H and W; D only starts halving once the network
has downsampled ``aniso_d`` times in-plane (the voxel is then roughly isotropic). A convolution that may not
stride or extend along depth yet is reduced along depth by *summing* its kernel: applying the summed kernel
equals applying the full 3D kernel to the input repeated along depth, which is how 2D and 3D inputs share
the same weights. Transposed convolutions and interpolation follow the mirrored rule on the way up.

Unlike the reference code, which carries ``aniso_d`` on a ``torch.Tensor`` subclass, the level is passed
explicitly as Python ints (``aniso_d``, ``level`` = in-plane downsamplings so far), so ``torch.compile``,
activation checkpointing and DistributedDataParallel see plain tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MAX_ANISO_D",
    "SpadConv3d",
    "SpadConvTranspose3d",
    "SpadDownsample",
    "SpadSequential",
    "SpadUpsample",
    "aniso_d_from_spacing",
    "default_aniso_d",
    "depth_stride",
    "inflate_2d_weight",
    "reduce_depth",
]

MAX_ANISO_D = 5
"""Largest anisotropy level: spacing ratios of 32 and above, and 2D images (reference code: ``dx << 1``, 32)."""


def aniso_d_from_spacing(spacing: Sequence[float] | None, max_aniso_d: int = MAX_ANISO_D) -> int:
    """Anisotropy level of a sample from its ``(s_z, s_y, s_x)`` spacing, depth first.

    ``None`` or a 2-element spacing (a 2D image) gives ``max_aniso_d``.

    >>> [aniso_d_from_spacing((r, 1.0, 1.0)) for r in (1, 2, 3.9, 4, 16, 40)]
    [0, 1, 1, 2, 4, 5]
    """
    if spacing is None or len(spacing) == 2:
        return max_aniso_d
    if len(spacing) != 3:
        raise ValueError(f"spacing must have 2 (2D) or 3 (depth, height, width) values, got {tuple(spacing)}.")
    sz, sy, sx = (float(s) for s in spacing)
    if not all(math.isfinite(s) and s > 0 for s in (sz, sy, sx)):
        raise ValueError(f"spacing must be positive and finite, got {tuple(spacing)}.")
    ratio = min(max(sz / min(sy, sx), 1.0), float(1 << max_aniso_d))
    # floor(log2(ratio)) through frexp, exact at powers of two
    return min(math.frexp(ratio)[1] - 1, max_aniso_d)


def default_aniso_d(x: torch.Tensor, aniso_d: int | None) -> int:
    """``aniso_d`` as given, else ``MAX_ANISO_D`` for a depth-1 input (2D) and 0 (isotropic 3D) otherwise."""
    if aniso_d is not None:
        if not 0 <= int(aniso_d) <= MAX_ANISO_D:
            raise ValueError(f"aniso_d must be in [0, {MAX_ANISO_D}], got {aniso_d}.")
        return int(aniso_d)
    return MAX_ANISO_D if x.shape[2] == 1 else 0


def depth_stride(stride: int, aniso_d: int, level: int) -> int:
    """Depth stride of a stride-``stride`` layer at ``level`` in-plane downsamplings for a sample of ``aniso_d``."""
    pending = max(aniso_d - level, 0)
    return max(stride >> pending, 1)


def reduce_depth(weight: torch.Tensor, depth: int) -> torch.Tensor:
    """Sum a conv kernel ``(..., kD, kH, kW)`` over groups of consecutive depth taps down to ``depth`` taps."""
    kd = weight.shape[2]
    if depth == kd:
        return weight
    if kd % depth:
        raise ValueError(f"cannot reduce a depth-{kd} kernel to depth {depth}.")
    return weight.unflatten(2, (depth, kd // depth)).sum(3)


def inflate_2d_weight(weight: torch.Tensor, depth: int) -> torch.Tensor:
    """2D kernel ``(O, I, kH, kW)`` -> 3D ``(O, I, depth, kH, kW)``, repeated over depth and divided by ``depth``.

    Summing the result over depth (:func:`reduce_depth` to 1) gives back the 2D kernel, so a 2D input sees the
    2D network's function exactly.
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a 2D conv kernel (O, I, kH, kW), got shape {tuple(weight.shape)}.")
    return weight.unsqueeze(2).expand(-1, -1, depth, -1, -1) / depth


def _log2_stride(stride: Sequence[int], what: str) -> int:
    s = stride[0]
    if any(t != s for t in stride) or s < 1 or s & (s - 1):
        raise ValueError(f"{what} needs the same power-of-two stride on every axis, got {tuple(stride)}.")
    return s.bit_length() - 1


class _Inflatable:
    """Load hook: a 2D (4-dim) ``weight`` in a state dict is inflated over depth (:func:`inflate_2d_weight`)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        w = state_dict.get(key)
        if w is not None and w.ndim == 4 and self.weight.ndim == 5:
            state_dict[key] = inflate_2d_weight(w, self.weight.shape[2])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SpadConv3d(_Inflatable, nn.Conv3d):
    """Conv3d whose depth stride and kernel adapt to the sample's anisotropy.

    Isotropic power-of-two stride only. While ``aniso_d - level > 0`` the depth stride is
    ``max(stride >> pending, 1)``; a stride-1 (in depth) application sums the kernel to one tap (kernel
    equal to the stride, or odd with "same" padding), a partial one sums groups of taps (kernel equal to the
    stride). ``level_change`` tells :class:`SpadSequential` how the in-plane level moves.

    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.level_change = _log2_stride(self.stride, "SpadConv3d")
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("SpadConv3d supports explicit integer zero padding only.")
        kd, s = self.kernel_size[0], self.stride[0]
        if not (kd == s or (kd % 2 == 1 and self.padding[0] == kd // 2)):
            raise ValueError(
                f"SpadConv3d needs a depth kernel equal to the stride or odd with 'same' padding, "
                f"got kernel {self.kernel_size}, stride {self.stride}, padding {self.padding}."
            )

    def forward(self, x: torch.Tensor, aniso_d: int = 0, level: int = 0) -> torch.Tensor:
        if aniso_d <= level:
            return super().forward(x)
        s = self.stride[0]
        sd = depth_stride(s, aniso_d, level)
        kd = self.kernel_size[0]
        taps = 1 if sd == 1 else sd
        if taps != 1 and kd != s:
            raise ValueError(f"cannot apply a depth kernel of {kd} with depth stride {sd} (stride {s}).")
        weight = reduce_depth(self.weight, taps if kd == s else 1)
        padding = (0, *self.padding[1:])
        return F.conv3d(x, weight, self.bias, (sd, *self.stride[1:]), padding, self.dilation, self.groups)


class SpadConvTranspose3d(_Inflatable, nn.ConvTranspose3d):
    """ConvTranspose3d with kernel == stride (power of two) that upsamples depth only where it was downsampled.

    At ``level`` in-plane downsamplings, depth has been downsampled ``max(level - aniso_d, 0)`` times; the depth
    stride is ``min(2 ** that, stride)`` and the kernel is summed over groups of taps accordingly.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size=stride, stride=stride, bias=bias)
        self.level_change = -_log2_stride(self.stride, "SpadConvTranspose3d")

    def forward(self, x: torch.Tensor, aniso_d: int = 0, level: int = 0) -> torch.Tensor:  # type: ignore[override]
        s = self.stride[0]
        sd = min(1 << max(level - aniso_d, 0), s)
        if sd == s:
            return F.conv_transpose3d(x, self.weight, self.bias, self.stride)
        weight = reduce_depth(self.weight, sd)
        return F.conv_transpose3d(x, weight, self.bias, (sd, s, s))


class SpadDownsample(nn.Module):
    """Interpolation by 1/2 in-plane, and in depth once ``level >= aniso_d``."""

    level_change = 1

    def __init__(self, mode: str = "area") -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor, aniso_d: int = 0, level: int = 0) -> torch.Tensor:
        sd = 0.5 if level >= aniso_d else 1.0
        return F.interpolate(x, scale_factor=(sd, 0.5, 0.5), mode=self.mode)


class SpadUpsample(nn.Module):
    """Interpolation by 2 in-plane, and in depth while depth is still below full resolution."""

    level_change = -1

    def __init__(self, mode: str = "trilinear") -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor, aniso_d: int = 0, level: int = 0) -> torch.Tensor:
        sd = 2.0 if level > aniso_d else 1.0
        return F.interpolate(x, scale_factor=(sd, 2.0, 2.0), mode=self.mode)


def _is_spad(m: nn.Module) -> bool:
    return isinstance(m, (SpadConv3d, SpadConvTranspose3d, SpadDownsample, SpadUpsample, SpadSequential))


class SpadSequential(nn.Sequential):
    """``nn.Sequential`` that passes ``(aniso_d, level)`` to its SPAD layers and tracks the level."""

    @property
    def level_change(self) -> int:
        return sum(getattr(m, "level_change", 0) for m in self if _is_spad(m))

    def forward(self, x: torch.Tensor, aniso_d: int = 0, level: int = 0) -> torch.Tensor:  # type: ignore[override]
        for m in self:
            if _is_spad(m):
                x = m(x, aniso_d, level)
                level += m.level_change
            else:
                x = m(x)
        return x
