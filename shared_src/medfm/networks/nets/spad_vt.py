"""SPAD-VT: the spacing-adaptive visual tokenizer of SPAD-Nets, and its patch discriminator."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from medfm.networks.blocks.soft_quantizer import SoftQuantizer, SoftQuantizerOutput
from medfm.networks.blocks.spad import SpadConv3d, SpadConvTranspose3d, SpadSequential, default_aniso_d

__all__ = ["ChannelLayerNorm", "SpadPatchDiscriminator", "SpadVT"]


class _MoveChannels(nn.Module):
    def __init__(self, source: int, destination: int) -> None:
        super().__init__()
        self.source, self.destination = source, destination

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.movedim(self.source, self.destination).contiguous()


class ChannelLayerNorm(nn.Sequential):
    """LayerNorm over the channels of a channel-first ``(N, C, *spatial)`` tensor.

    Built as ``(channels-last, nn.LayerNorm(C), channels-first)`` like the reference's ``LayerNormNd``, so its
    parameters are ``1.weight`` / ``1.bias`` there and here.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(_MoveChannels(1, -1), nn.LayerNorm(num_channels, eps=eps), _MoveChannels(-1, 1))


def _check_groups(channels: Sequence[int], groups: int, what: str) -> None:
    bad = [c for c in channels if c % groups]
    if groups < 1 or bad:
        raise ValueError(f"{what} must divide every channel count {tuple(channels)}, got {groups}.")


def _conv_norm_act(c_in: int, c_out: int, groups: int) -> list[nn.Module]:
    return [SpadConv3d(c_in, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.LeakyReLU(inplace=True)]


class SpadVT(nn.Module):
    """SPAD-VT tokenizer (Luo et al., "Building Universal Foundation Models for Medical Image Analysis with
    Spatially Adaptive Networks", arXiv:2312.07630; reference PUMIT ``SimpleVQTokenizer`` + soft quantizer).

    Encoder: SPAD conv k=s=``start_stride`` ``in_channels -> channels[0]``, then k=s=2 convs up the
    ``channels``, each followed by a channel LayerNorm and GELU; two SPAD k3 convs (GroupNorm + LeakyReLU) at
    ``channels[-1]``; total stride ``start_stride * 2 ** (len(channels) - 1)`` (16). Soft quantizer
    (``channels[-1] -> num_codes``, codebook ``num_codes x code_dim``). Decoder mirrors it: two k3 convs, then per
    stage a SPAD transposed conv k=s=2 followed by a k3 conv + GroupNorm + LeakyReLU, and a final transposed conv
    k=s=``start_stride`` to ``in_channels``. Depth is strided only as the anisotropy allows (see
    :mod:`medfm.networks.blocks.spad`).

    Input convention: the tokenizer sees ``2 x - 1`` of images in [0, 1] (the caller scales, e.g.
    :class:`medfm.engines.SpadInputPrepareBatch`), RGB-replicated for ``in_channels=3``; it reconstructs in that
    range (no output activation, so values are [-1, 1]-ish).

    State-dict keys are those of the reference (``encoder.{i}``, ``quantize.{proj,embedding}``, ``decoder.{i}``
    with ``decoder.{6,7}.{transposed_conv,conv.0,conv.1}``, LayerNorms at ``encoder.{1,4,7}.1``): the
    ``model`` entry of the official ``simple-soft.ckpt`` loads with ``strict=True`` into the default
    configuration (:func:`medfm.networks.pumit_release.convert_pumit_tokenizer`, ``tools/convert_pumit.py``).

    Args:
        in_channels: image channels (3: the reference feeds RGB-replicated images).
        channels: encoder stage channels, mirrored by the decoder.
        start_stride: stride of the first (patchifying) conv, a power of two.
        num_codes: codebook size.
        code_dim: code dimension (the reference's ``embedding_dim``).
        norm_groups: GroupNorm groups of the k3 convs.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: Sequence[int] = (128, 256, 512),
        start_stride: int = 4,
        num_codes: int = 1024,
        code_dim: int = 512,
        norm_groups: int = 8,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels or min(channels) < 1 or in_channels < 1:
            raise ValueError(f"channels and in_channels must be positive, got {channels} and {in_channels}.")
        if start_stride < 2 or start_stride & (start_stride - 1):
            raise ValueError(f"start_stride must be a power of two >= 2, got {start_stride}.")
        _check_groups(channels, norm_groups, "norm_groups")
        self.in_channels = in_channels
        c_top = channels[-1]
        enc: list[nn.Module] = []
        for i, c in enumerate(channels):
            s = start_stride if i == 0 else 2
            enc += [
                SpadConv3d(in_channels if i == 0 else channels[i - 1], c, s, stride=s),
                ChannelLayerNorm(c),
                nn.GELU(),
            ]
        enc += _conv_norm_act(c_top, c_top, norm_groups) + _conv_norm_act(c_top, c_top, norm_groups)
        self.encoder = SpadSequential(*enc)
        self.quantize = SoftQuantizer(c_top, num_codes, code_dim)
        dec: list[nn.Module] = _conv_norm_act(code_dim, c_top, norm_groups) + _conv_norm_act(c_top, c_top, norm_groups)
        for i in reversed(range(len(channels) - 1)):
            up = OrderedDict(
                transposed_conv=SpadConvTranspose3d(channels[i + 1], channels[i], 2),
                conv=SpadSequential(*_conv_norm_act(channels[i], channels[i], norm_groups)),
            )
            dec.append(SpadSequential(up))
        dec.append(SpadConvTranspose3d(channels[0], in_channels, start_stride))
        self.decoder = SpadSequential(*dec)
        self._levels = self.encoder.level_change

    def no_weight_decay(self) -> set[str]:
        """The codebook is exempt from weight decay (as in the reference code)."""
        return {"quantize.embedding.weight"}

    @property
    def stride(self) -> int:
        """In-plane (and isotropic) downsampling factor of the token grid (16)."""
        return 1 << self._levels

    @property
    def codebook_size(self) -> int:
        return self.quantize.num_codes

    def _check(self, x: torch.Tensor, aniso_d: int | None) -> int:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected an (N, {self.in_channels}, D, H, W) image, got shape {tuple(x.shape)}.")
        aniso_d = default_aniso_d(x, aniso_d)
        sd = max(self.stride >> aniso_d, 1)
        d, h, w = x.shape[2:]
        if h % self.stride or w % self.stride or d % sd:
            raise ValueError(
                f"image (D, H, W) = {(d, h, w)} must be divisible by ({sd}, {self.stride}, {self.stride}) "
                f"for aniso_d={aniso_d}."
            )
        return aniso_d

    def encode(self, x: torch.Tensor, aniso_d: int | None = None) -> torch.Tensor:
        """(N, C, D, H, W) image -> (N, channels[-1], D / (16 >> aniso_d), H / 16, W / 16) features."""
        return self.encoder(x, self._check(x, aniso_d), 0)

    def decode(self, z_q: torch.Tensor, aniso_d: int) -> torch.Tensor:
        """(N, code_dim, d, h, w) quantized features -> (N, in_channels, D, H, W) reconstruction; ``aniso_d`` of
        the image the tokens came from (a token grid's depth cannot tell it)."""
        return self.decoder(z_q, aniso_d, self._levels)

    def tokenize(self, x: torch.Tensor, aniso_d: int | None = None) -> SoftQuantizerOutput:
        """Encode and quantize only; ``logits`` / ``probs`` (N, d, h, w, K) are SPAD-ViT's MIM targets."""
        return self.quantize(self.encode(x, aniso_d))

    def forward(self, x: torch.Tensor, aniso_d: int | None = None) -> tuple[torch.Tensor, SoftQuantizerOutput]:
        """
        Args:
            x: (N, C, D, H, W) image in [-1, 1]; D through-plane, a 2D image has D = 1.
            aniso_d: anisotropy level 0..5 (None: 5 for D = 1, else 0).

        Returns:
            ``(x_rec, quant_out)``: x_rec (N, C, D, H, W) and the :class:`SoftQuantizerOutput`.
        """
        aniso_d = self._check(x, aniso_d)
        quant_out = self.quantize(self.encoder(x, aniso_d, 0))
        return self.decode(quant_out.z_q, aniso_d), quant_out


class SpadPatchDiscriminator(SpadSequential):
    """Patch discriminator of SPAD-VT's GAN term (PUMIT ``SimplePatchDiscriminator``).

    Per stage a SPAD conv k3 s2 p1 + GroupNorm + LeakyReLU, ``num_post_convs`` k3 p1 convs (same norm/act) and
    a final k3 p1 conv to one score channel. Keys ``{i}.weight`` / ``{i}.bias`` as the reference's.

    Args:
        in_channels: image channels.
        channels: stage channels (reference 128, 256, 512).
        num_post_convs: stride-1 convs after the last stage.
        norm_groups: GroupNorm groups (reference 16); must divide every channel count.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: Sequence[int] = (128, 256, 512),
        num_post_convs: int = 1,
        norm_groups: int = 16,
    ) -> None:
        channels = tuple(int(c) for c in channels)
        if not channels or min(channels) < 1 or in_channels < 1 or num_post_convs < 0:
            raise ValueError(
                f"bad discriminator sizes: in_channels={in_channels}, channels={channels}, "
                f"num_post_convs={num_post_convs}."
            )
        _check_groups(channels, norm_groups, "norm_groups")
        layers: list[nn.Module] = []
        for i, c in enumerate(channels):
            c_in = in_channels if i == 0 else channels[i - 1]
            layers += [
                SpadConv3d(c_in, c, 3, stride=2, padding=1),
                nn.GroupNorm(norm_groups, c),
                nn.LeakyReLU(inplace=True),
            ]
        for _ in range(num_post_convs):
            layers += _conv_norm_act(channels[-1], channels[-1], norm_groups)
        layers.append(SpadConv3d(channels[-1], 1, 3, padding=1))
        super().__init__(*layers)

    def forward(self, x: torch.Tensor, aniso_d: int | None = None, level: int = 0) -> torch.Tensor:  # type: ignore[override]
        """(N, C, D, H, W) image in [-1, 1] -> (N, 1, d, H / 2^s, W / 2^s) patch scores (raw, for hinge losses)."""
        return super().forward(x, default_aniso_d(x, aniso_d), level)
