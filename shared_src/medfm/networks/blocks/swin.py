"""2D Swin Transformer backbone with Microsoft's parameter names (the M-IDoL backbone, Swin-B by default).

Why not MONAI's ``monai.networks.nets.swin_unetr.SwinTransformer(spatial_dims=2)``: it cannot hold the
Microsoft / M-IDoL checkpoint one-to-one.

- It builds a patch merging after *every* stage, the fourth included (``layers4.0.downsample``: weights that the
  checkpoint lacks), and returns stage 4 only after that merging (1/64 resolution, 16x embed_dim channels), so the
  1024-d Swin-B feature is not among its outputs.
- It has no learnable final LayerNorm (``norm.{weight,bias}`` of the checkpoint): ``proj_out`` normalises
  every stage without affine parameters.
- Names differ beyond a prefix: ``layers1.0`` ... ``layers4.0`` for ``layers.0`` ... ``layers.3``, and
  ``mlp.linear1/linear2`` for ``mlp.fc1/fc2``.
- Its attention goes through SDPA only without autograd (``use_flash_attention``); training uses the explicit
  softmax path.

What does match (and is reproduced here): the 2D patch merging order (MONAI's ``x[:, j::2, i::2]`` over
``(i, j) in product(range(2), range(2))`` is Microsoft's x0=[0::2,0::2], x1=[1::2,0::2], x2=[0::2,1::2],
x3=[1::2,1::2]), the ``((2w-1)^2, heads)`` relative position bias table with index ``(dh+w-1)(2w-1) + dw+w-1``,
the optional patch-embedding LayerNorm (``patch_norm=True`` there), the -100 shifted-window mask and the window
shrinking to the stage resolution.

Derived geometry (``relative_position_index``) is a non-persistent buffer; the shifted-window mask is built
from the feature size at forward time; neither is in the state dict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from .sizes import SWIN_SIZES, resolve_size
from .transformer_block import Mlp
from .trunk import resolve_indices
from .vit_encoder import init_trunc_normal_weights

__all__ = [
    "PatchMerging",
    "SwinBackbone",
    "SwinBlock",
    "SwinStage",
    "WindowAttention",
    "relative_position_index",
    "shifted_window_mask",
    "window_partition",
    "window_reverse",
]

MASK_VALUE = -100.0  # Microsoft's value for attention across shifted-window regions


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, window_size**2, C), windows in row-major order; H, W multiples of window_size."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, -1, window_size * window_size, c)


def window_reverse(windows: torch.Tensor, window_size: int, h: int, w: int) -> torch.Tensor:
    """(B, nW, window_size**2, C) -> (B, H, W, C); inverse of :func:`window_partition`."""
    b, c = windows.shape[0], windows.shape[-1]
    x = windows.view(b, h // window_size, w // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def relative_position_index(window_size: int) -> torch.Tensor:
    """(N, N) long, N = window_size**2: row of the bias table for query i, key j of a window
    (``(dh + ws - 1) * (2 ws - 1) + dw + ws - 1`` with ``d = pos_i - pos_j``)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    rel = coords.flatten(1)[:, :, None] - coords.flatten(1)[:, None, :] + (window_size - 1)  # (2, N, N)
    return rel[0] * (2 * window_size - 1) + rel[1]


def shifted_window_mask(h: int, w: int, window_size: int, shift: int, device: torch.device | None = None):
    """(nW, N, N) float additive mask of shifted-window attention on an (h, w) map (multiples of window_size):
    0 where query and key come from the same region before the cyclic shift, -100 elsewhere."""
    ys, xs = torch.arange(h, device=device), torch.arange(w, device=device)
    # regions [0, h-ws), [h-ws, h-shift), [h-shift, h) along each axis
    ry = (ys >= h - window_size).long() + (ys >= h - shift).long()
    rx = (xs >= w - window_size).long() + (xs >= w - shift).long()
    region = (ry[:, None] * 3 + rx[None, :]).float()[None, :, :, None]  # (1, h, w, 1)
    win = window_partition(region, window_size)[0, :, :, 0]  # (nW, N)
    return (win[:, None, :] != win[:, :, None]).float() * MASK_VALUE


class WindowAttention(nn.Module):
    """Window multi-head self-attention with a learned relative position bias (Liu et al., Swin Transformer,
    arXiv:2103.14030), through SDPA with the bias (plus the shifted-window mask) as a float ``attn_mask``.

    Args:
        dim: token width.
        num_heads: heads; must divide dim.
        window_size: window side (tokens per window: window_size**2).
        qkv_bias: bias on q, k, v.
        attn_drop: dropout on attention weights during training.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True, attn_drop: float = 0.0):
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}.")
        self.num_heads, self.window_size, self.attn_drop = num_heads, window_size, attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)

    def relative_position_bias(self) -> torch.Tensor:
        """(heads, N, N) bias gathered from the table."""
        n = self.window_size**2
        return self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: (B, nW, N, C) tokens of nW windows of N tokens.
            mask: optional (nW, N, N) additive float mask (shifted windows).

        Returns:
            (B, nW, N, C).
        """
        b, nw, n, c = x.shape
        h, d = self.num_heads, c // self.num_heads
        qkv = self.qkv(x).view(b, nw, n, 3, h, d).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, heads, N, d)
        bias = self.relative_position_bias()
        if mask is None:  # one bias for every window: windows as batch
            q, k, v = qkv.reshape(3, b * nw, h, n, d).unbind(0)
        else:  # a mask per window: fold windows into heads so the (nW*heads, N, N) mask broadcasts over B
            q, k, v = qkv.reshape(3, b, nw * h, n, d).unbind(0)
            bias = (bias[None] + mask[:, None]).reshape(nw * h, n, n)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.attn_drop if self.training else 0.0
        )
        return self.proj(out.reshape(b, nw, h, n, d).transpose(2, 3).reshape(b, nw, n, c))


class SwinBlock(nn.Module):
    """x + W-MSA(LN(x)) (cyclically shifted by ``shift`` when > 0), then x + MLP(LN(x)); stochastic depth on both.

    Args:
        dim: token width.
        num_heads: heads.
        window_size: window side.
        shift: cyclic shift (0: regular windows; Swin uses window_size // 2 on every second block).
        mlp_ratio: MLP width / dim.
        qkv_bias: bias on q, k, v.
        drop_path: stochastic-depth rate.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 <= shift < window_size:
            raise ValueError(f"shift must be in [0, window_size={window_size}), got {shift}.")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}.")
        self.window_size, self.shift = window_size, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: (B, H, W, C).
            mask: (nW, N, N) shifted-window mask for the padded (H, W) when ``shift > 0``, else None.

        Returns:
            (B, H, W, C).
        """
        _, h, w, _ = x.shape
        ws, s = self.window_size, self.shift
        y = self.norm1(x)
        ph, pw = (-h) % ws, (-w) % ws
        y = F.pad(y, (0, 0, 0, pw, 0, ph))  # no-op when the map tiles into windows
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = window_reverse(self.attn(window_partition(y, ws), mask if s else None), ws, h + ph, w + pw)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + self.drop_path(y[:, :h, :w])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbour concatenation (Microsoft's order x0=[0::2,0::2], x1=[1::2,0::2], x2=[0::2,1::2],
    x3=[1::2,1::2]) -> LayerNorm(4C) -> Linear(4C -> 2C, no bias). (B, H, W, C) -> (B, H/2, W/2, 2C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        # (B, H/2, [row offset], W/2, [col offset], C) -> offsets ordered (col, row): (0,0), (1,0), (0,1), (1,1)
        x = x.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """``depth`` Swin blocks alternating regular and shifted windows, then an optional :class:`PatchMerging`.

    Returns the stage output before merging (the stage's feature map) and after it (the next stage's input).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        shift: int,
        mlp_ratio: float,
        drop_path: Sequence[float],
        downsample: bool,
    ) -> None:
        super().__init__()
        self.window_size, self.shift = window_size, shift
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, shift if j % 2 else 0, mlp_ratio, drop_path=drop_path[j])
            for j in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else nn.Identity()
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, H, W, C) -> ((B, H, W, C), (B, H/2, W/2, 2C) or the same map for the last stage)."""
        _, h, w, _ = x.shape
        ws = self.window_size
        mask = None
        if self.shift:
            mask = shifted_window_mask(h + (-h) % ws, w + (-w) % ws, ws, self.shift, x.device)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, mask)
        return x, self.downsample(x)


class SwinBackbone(nn.Module):
    """2D Swin Transformer (Liu et al., arXiv:2103.14030) as the M-IDoL backbone (Swin-B: patch 4, window 7,
    dim 128, depths 2-2-18-2, heads 4-8-16-32 -> 1024-d pooled feature), with Microsoft's parameter names
    (``patch_embed.{proj,norm}``, ``layers.{i}.blocks.{j}.*``, ``layers.{i}.downsample.*``, ``norm``) so the
    official and the M-IDoL checkpoints load after a prefix strip.

    The window of a stage whose resolution (at ``img_size``) is not larger than ``window_size`` shrinks to
    that resolution and is never shifted (as in Microsoft's code; it sets the bias-table shapes). Other input
    sizes work when they are multiples of ``patch_size * 2**(stages-1)``: maps are padded to whole windows.

    Args:
        img_size: training image side (sets the per-stage windows).
        in_channels: image channels.
        patch_size: patch side; None takes the ``size``'s.
        window_size: attention window side; None takes the ``size``'s.
        embed_dim: stage-1 width; stage i has ``embed_dim * 2**i``; None takes the ``size``'s.
        depths: blocks per stage; None takes the ``size``'s.
        num_heads: heads per stage; None takes the ``size``'s.
        mlp_ratio: MLP width / token width; None takes the ``size``'s.
        drop_path_rate: stochastic depth, increasing linearly from 0 to this over all blocks.
        size: a name of :data:`~medfm.networks.blocks.SWIN_SIZES` (``base``: Swin-B) or a mapping of its six
            keywords (``patch_size``, ``window_size``, ``embed_dim``, ``depths``, ``num_heads``, ``mlp_ratio``), for
            those passed as None.
    """

    def __init__(
        self,
        img_size: int = 224,
        in_channels: int = 3,
        patch_size: int | None = None,
        window_size: int | None = None,
        embed_dim: int | None = None,
        depths: Sequence[int] | None = None,
        num_heads: Sequence[int] | None = None,
        mlp_ratio: float | None = None,
        drop_path_rate: float = 0.1,
        size: str | Mapping[str, Any] = "base",
    ) -> None:
        super().__init__()
        given = {"patch_size": patch_size, "window_size": window_size, "embed_dim": embed_dim, "depths": depths}
        patch_size, window_size, embed_dim, depths, num_heads, mlp_ratio = resolve_size(
            SWIN_SIZES, size, **given, num_heads=num_heads, mlp_ratio=mlp_ratio
        ).values()
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"depths={tuple(depths)} and num_heads={tuple(num_heads)} need the same length >= 1.")
        if min(depths) < 1 or window_size < 1 or patch_size < 1 or embed_dim < 1:
            raise ValueError(f"depths, window_size={window_size}, patch_size={patch_size}, embed_dim must be >= 1.")
        self.stride = patch_size * 2 ** (len(depths) - 1)
        if img_size % self.stride != 0:
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size * 2**(stages-1) = {self.stride}.")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}.")
        for i, h in enumerate(num_heads):
            if h < 1 or (embed_dim * 2**i) % h != 0:
                raise ValueError(f"stage {i}: width {embed_dim * 2**i} is not divisible by num_heads={h}.")
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.patch_embed.norm = nn.LayerNorm(embed_dim)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            res = img_size // patch_size // 2**i
            ws, shift = (res, 0) if res <= window_size else (window_size, window_size // 2)
            used = sum(depths[:i])
            last = i == len(depths) - 1
            self.layers.append(
                SwinStage(embed_dim * 2**i, depth, heads, ws, shift, mlp_ratio, dpr[used : used + depth], not last)
            )
        self.norm = nn.LayerNorm(self.num_features)
        self.apply(init_trunc_normal_weights)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (less memory, about a third more compute)."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay (the relative position bias tables, as in Swin)."""
        return {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | Sequence[int] = (), *, stop_early: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The contract of :mod:`medfm.networks.blocks.trunk`, over stages instead of blocks.

        Args:
            x: (B, in_channels, H, W), H and W multiples of ``patch_size * 2**(stages-1)``.
            indices: stage indices (negative from the end) or a count of last stages.
            stop_early: run only up to the deepest requested stage; ``final`` is then that stage's map without the
                final LayerNorm (which has the last stage's width).

        Returns:
            ``final`` (B, num_features, H / stride, W / stride), the last stage's map after the final LayerNorm,
            and the maps of the stages in ``indices`` in the order asked, stage i
            (B, embed_dim * 2**i, H / (patch_size * 2**i), W / (patch_size * 2**i)), taken before the stage's
            patch merging and without the final LayerNorm.
        """
        wanted = resolve_indices(indices, len(self.layers))
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, H, W), got {tuple(x.shape)}.")
        if x.shape[2] % self.stride or x.shape[3] % self.stride:
            raise ValueError(f"H and W must be multiples of {self.stride}, got {tuple(x.shape[2:])}.")
        depth = max(wanted) + 1 if stop_early and wanted else len(self.layers)
        x = self.patch_embed.norm(self.patch_embed.proj(x).permute(0, 2, 3, 1))  # (B, H/p, W/p, C)
        outs = []
        for layer in self.layers[:depth]:
            out, x = layer(x)
            outs.append(out)
        final = self.norm(outs[-1]) if depth == len(self.layers) else outs[-1]
        return final.permute(0, 3, 1, 2), [outs[i].permute(0, 3, 1, 2) for i in wanted]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """
        Args:
            x: (B, in_channels, H, W), H and W multiples of ``patch_size * 2**(stages-1)``.

        Returns:
            one map per stage, (B, embed_dim * 2**i, H / (patch_size * 2**i), W / (patch_size * 2**i)), taken
            before the stage's patch merging; the last one after the final LayerNorm.
        """
        final, stages = self.forward_intermediates(x, range(len(self.layers) - 1))
        return [*stages, final]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, H, W) -> (B, num_features) average-pooled normalised last-stage feature."""
        return self.forward_features(x)[-1].mean((2, 3))
