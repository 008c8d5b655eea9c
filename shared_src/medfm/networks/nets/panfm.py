"""Pan-FM: one ViT over the organs a subject has, and its DINO/iBOT self-distillation pair.

Pan-FM (Wu et al., arXiv:2605.07055) pre-trains one backbone on MRI of seven organs with organs missing not at
random. Only the abstract is public; the design here is our proposal (``notes/METHODS.md`` section 3):
per-organ patch embeddings, an organ-type embedding, CLS, one shared transformer; a missing organ has no
tokens at all (packed sequences with a key-padding mask); a *masked* organ (present but hidden) keeps its
tokens, replaced by a learned mask token that still carries its position and organ embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from monai.utils import ensure_tuple_rep
from torch import nn

from medfm.masking.saliency import organ_attention_share
from medfm.networks.blocks import PatchEmbed, TransformerBlock, init_transformer_weights, sincos_pos_embed, token_grid
from medfm.networks.blocks.dino_head import DINOHead
from medfm.networks.blocks.ema import EMATeacherPair
from medfm.networks.blocks.sizes import VIT_SIZES, resolve_size
from medfm.networks.blocks.trunk import TransformerTrunk
from medfm.organs import PANFM_ORGANS
from medfm.utils.dist import is_distributed

__all__ = ["PANFM_ORGANS", "PanFMEncoder", "PanFMOutput", "PanFMSelfDistill", "panfm_encoder_state"]


class PanFMOutput(NamedTuple):
    """Encoder output. Lmax is the longest sample's token count in the batch (CLS excluded).

    cls: (B, C) normed CLS token.
    tokens: (B, Lmax, C) normed patch tokens, each sample's present organs in organ order, raster order within
        an organ, padding at the end.
    token_organ: (B, Lmax) long, organ index of each token, -1 for padding.
    valid: (B, Lmax) bool, True = real token (not padding).
    masked: (B, Lmax) bool, True = token of a masked organ (fed the mask token).
    organ_attention: (B, O) float32 token-normalised share of the last block's CLS attention per organ: each
        organ's mean attention per token, normalised to sum to 1 over the present organs (0 for missing ones;
        :func:`medfm.masking.organ_attention_share`), or None when not asked for.
    """

    cls: torch.Tensor
    tokens: torch.Tensor
    token_organ: torch.Tensor
    valid: torch.Tensor
    masked: torch.Tensor
    organ_attention: torch.Tensor | None = None


class PanFMEncoder(nn.Module):
    """Pan-organ ViT encoder (Pan-FM, arXiv:2605.07055; ViT: arXiv:2010.11929) over packed organ tokens.

    Each organ has its own patch embedding (a conv with kernel = stride = patch, computed as a matrix product by
    :class:`~medfm.networks.blocks.PatchEmbed`) and a fixed sine-cosine position embedding of its token grid; a
    learned organ-type embedding is added to all of its tokens. Organ o of sample b is embedded only if
    ``present[b, o]``: the organ's images are index-selected to the samples that have it, so a missing organ
    costs no FLOP, and an organ missing from the whole batch never runs its embedding. The tokens of each sample
    are then packed into ``(B, 1 + Lmax, C)`` (CLS first, organs in ``organs`` order) with a key-padding mask.

    Under DistributedDataParallel pass ``find_unused_parameters=True``: the patch embedding of an organ missing
    from a whole batch gets no gradient.

    Args:
        organs: organ names, in the column order of ``present``.
        organ_shapes: organ -> spatial shape of its image (2 or 3 dims), each a multiple of its patch size.
        patch_size: one patch size for all organs (int or per dim), or organ -> patch size.
        in_channels: image channels.
        hidden_size: token width (ViT-B: 768); None takes the ``size``'s.
        num_layers: blocks (ViT-B: 12); None takes the ``size``'s.
        num_heads: heads (ViT-B: 12); None takes the ``size``'s.
        mlp_dim: MLP width (ViT-B: 3072); None takes the ``size``'s.
        drop_path_rate: stochastic depth, linearly increasing over blocks up to this rate.
        qkv_bias: bias on q, k, v.
        pos_embed_scale: factor on the sine-cosine position embeddings, kept in the buffer ``pos_scale`` (saved
            with the weights, so a checkpoint keeps the factor it was trained with).
        size: a name of :data:`~medfm.networks.blocks.VIT_SIZES` (``base``: ViT-B) or a mapping of the four size
            keywords, for those passed as None.

    Each organ also has a mean image (buffer ``input_mean_<organ>``, zeros unless
    :meth:`update_input_mean` fills it) that is subtracted from its images before the patch embedding. Checkpoints
    written before these buffers existed load with ``pos_scale`` 1 and zero means, which is how they were trained.
    """

    def __init__(
        self,
        organs: Sequence[str],
        organ_shapes: Mapping[str, Sequence[int]],
        *,
        patch_size: int | Sequence[int] | Mapping[str, int | Sequence[int]] = 8,
        in_channels: int = 1,
        hidden_size: int | None = None,
        num_layers: int | None = None,
        num_heads: int | None = None,
        mlp_dim: int | None = None,
        drop_path_rate: float = 0.0,
        qkv_bias: bool = True,
        pos_embed_scale: float = 1.0,
        size: str | Mapping[str, int] = "base",
    ) -> None:
        super().__init__()
        hidden_size, num_layers, num_heads, mlp_dim = resolve_size(
            VIT_SIZES, size, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, mlp_dim=mlp_dim
        ).values()
        self.organs = tuple(organs)
        if not self.organs or len(set(self.organs)) != len(self.organs):
            raise ValueError(f"organs must be distinct names, at least one, got {list(organs)}.")
        if num_layers < 1:
            raise ValueError(f"num_layers must be positive, got {num_layers}.")
        if not math.isfinite(pos_embed_scale) or pos_embed_scale < 0:
            raise ValueError(f"pos_embed_scale must be finite and >= 0, got {pos_embed_scale}.")
        missing = [o for o in self.organs if o not in organ_shapes]
        if missing:
            raise ValueError(f"organ_shapes has no shape for {missing} (given: {sorted(organ_shapes)}).")
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.in_channels = in_channels
        self.organ_shapes = {o: tuple(int(s) for s in organ_shapes[o]) for o in self.organs}
        self.patch_embed = nn.ModuleDict()
        self.num_tokens: dict[str, int] = {}
        for o in self.organs:
            shape = self.organ_shapes[o]
            if len(shape) not in (2, 3):
                raise ValueError(f"organ {o!r}: shape {shape} must have 2 or 3 spatial dims.")
            p = patch_size[o] if isinstance(patch_size, Mapping) else patch_size
            p = ensure_tuple_rep(p, len(shape))
            try:
                grid = token_grid(shape, p)
            except ValueError as e:
                raise ValueError(f"organ {o!r}: {e}") from None
            self.patch_embed[o] = PatchEmbed(in_channels, hidden_size, p, spatial_dims=len(shape))
            self.num_tokens[o] = math.prod(grid)
            self.register_buffer(f"pos_{o}", sincos_pos_embed(grid, hidden_size), persistent=False)
            self.register_buffer(f"input_mean_{o}", torch.zeros(in_channels, *shape))
        self.register_buffer("pos_scale", torch.tensor(float(pos_embed_scale)))
        self.register_buffer("input_count", torch.zeros(len(self.organs)))
        self._register_load_state_dict_pre_hook(self._fill_legacy_state)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.organ_embed = nn.Parameter(torch.zeros(len(self.organs), hidden_size))
        self.blocks = TransformerTrunk(
            lambda r: TransformerBlock(hidden_size, num_heads, mlp_dim, qkv_bias=qkv_bias, drop_path=r),
            num_layers,
            drop_path_rate,
        )
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        for m in (self.blocks, self.norm):
            m.apply(init_transformer_weights)
        for p in (self.cls_token, self.mask_token, self.organ_embed):
            nn.init.normal_(p, std=0.02)

    def legacy_state(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The buffers that checkpoints from before ``pos_scale`` and the mean images lack, with the values under
        which those checkpoints were trained (scale 1, zero means), keyed ``prefix + name``."""
        out = {prefix + "pos_scale": torch.tensor(1.0), prefix + "input_count": torch.zeros_like(self.input_count)}
        for o in self.organs:
            out[prefix + f"input_mean_{o}"] = torch.zeros_like(getattr(self, f"input_mean_{o}"))
        return out

    def _fill_legacy_state(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Load hook: a state dict with this encoder's weights but none of the new buffers gets the legacy values."""
        if prefix + "cls_token" in state_dict and prefix + "pos_scale" not in state_dict:
            for k, v in self.legacy_state(prefix).items():
                state_dict.setdefault(k, v)

    @torch.no_grad()
    def update_input_mean(self, images: Mapping[str, torch.Tensor], present: torch.Tensor) -> None:
        """Add the present organs' images to each organ's running mean image (the mean of every image seen so far,
        over all DDP ranks).

        Args:
            images: organ -> (B, in_channels, *organ_shape); only the rows where the organ is present are read.
            present: (B, O) bool.
        """
        pres = self._check(images, present, None)
        sums = []
        for o, organ in enumerate(self.organs):
            rows = pres[:, o].nonzero().flatten()
            mean = getattr(self, f"input_mean_{organ}")
            if rows.numel():
                sums.append(images[organ].index_select(0, rows.to(mean.device)).float().sum(0).flatten())
            else:
                sums.append(torch.zeros_like(mean).flatten())
        counts = pres.sum(0).to(self.input_count)
        flat = torch.cat([*sums, counts])
        if is_distributed():
            dist.all_reduce(flat)
        *sums, counts = flat.split([*(t.numel() for t in sums), len(self.organs)])
        for o, organ in enumerate(self.organs):
            n = float(counts[o])
            if n > 0:
                mean = getattr(self, f"input_mean_{organ}")
                total = self.input_count[o] + n
                mean.add_((sums[o].view_as(mean) - n * mean) / total)
                self.input_count[o] = total

    def no_weight_decay(self) -> set[str]:
        """Parameter names that an optimiser should not decay."""
        return {"cls_token", "mask_token", "organ_embed"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory."""
        self.blocks.set_grad_checkpointing(enable)

    def _check(
        self, images: Mapping[str, torch.Tensor], present: torch.Tensor, organ_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Validate the inputs; returns ``present`` on the host."""
        n_org = len(self.organs)
        if present.dtype != torch.bool or present.ndim != 2 or present.shape[1] != n_org:
            raise ValueError(
                f"present must be (B, {n_org}) bool for organs {self.organs}, got {present.dtype} "
                f"{tuple(present.shape)}."
            )
        if organ_mask is not None and (organ_mask.dtype != torch.bool or organ_mask.shape != present.shape):
            raise ValueError(
                f"organ_mask must be bool of shape {tuple(present.shape)}, got {organ_mask.dtype} "
                f"{tuple(organ_mask.shape)}."
            )
        pres = present.cpu()
        empty = (~pres.any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"subject(s) at batch index {empty} have no present organ: nothing to encode.")
        b = present.shape[0]
        for o, used in zip(self.organs, pres.any(0).tolist()):
            if not used:
                continue
            if o not in images:
                raise KeyError(f"organ {o!r} is present in the batch but has no image (got {sorted(images)}).")
            want = (b, self.in_channels, *self.organ_shapes[o])
            if tuple(images[o].shape) != want:
                raise ValueError(f"organ {o!r}: expected an image of shape {want}, got {tuple(images[o].shape)}.")
        return pres

    def pack(
        self, images: Mapping[str, torch.Tensor], present: torch.Tensor, organ_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embed the present organs and pack them per sample.

        Returns:
            tokens (B, Lmax, C) with position and organ embeddings (zeros at padding), token_organ (B, Lmax)
            long (-1 = padding), masked (B, Lmax) bool.
        """
        pres = self._check(images, present, organ_mask)  # on the host: index bookkeeping without device syncs
        device = present.device
        n_tok = torch.tensor([self.num_tokens[o] for o in self.organs])
        counts = pres.long() * n_tok
        offsets = counts.cumsum(1) - counts  # (B, O): where each organ starts in its sample's sequence
        b, lmax = pres.shape[0], int(counts.sum(1).max())
        src = torch.zeros(b * lmax, dtype=torch.long)  # row of the flat token table for every slot; 0 = padding
        token_organ = torch.full((b * lmax,), -1, dtype=torch.long)
        chunks: list[torch.Tensor] = []
        start = 1
        for o, organ in enumerate(self.organs):
            rows = pres[:, o].nonzero().flatten()
            if rows.numel() == 0:
                continue  # missing from the whole batch: its embedding never runs
            n = self.num_tokens[organ]
            x = images[organ].index_select(0, rows.to(device))
            x = x - getattr(self, f"input_mean_{organ}").to(x.dtype)
            tok, _ = self.patch_embed[organ](x)  # (B_o, n, C)
            if organ_mask is not None:
                hide = organ_mask[:, o].index_select(0, rows.to(device))
                tok = torch.where(hide[:, None, None], self.mask_token.to(tok.dtype), tok)
            pos = (getattr(self, f"pos_{organ}") * self.pos_scale).to(tok.dtype)
            tok = tok + pos + self.organ_embed[o].to(tok.dtype)
            chunks.append(tok.reshape(-1, self.hidden_size))
            dest = (rows * lmax + offsets[rows, o]).unsqueeze(1) + torch.arange(n)  # (B_o, n)
            src[dest.flatten()] = torch.arange(start, start + dest.numel())
            token_organ[dest.flatten()] = o
            start += dest.numel()
        table = torch.cat([chunks[0].new_zeros(1, self.hidden_size), *chunks])
        tokens = table.index_select(0, src.to(device)).view(b, lmax, self.hidden_size)
        token_organ = token_organ.view(b, lmax).to(device)
        valid = token_organ >= 0
        if organ_mask is None:
            masked = torch.zeros_like(valid)
        else:
            masked = valid & organ_mask.gather(1, token_organ.clamp_min(0))
        return tokens, token_organ, masked

    def forward_intermediates(
        self,
        images: Mapping[str, torch.Tensor],
        indices: int | Sequence[int] = (),
        *,
        present: torch.Tensor,
        organ_mask: torch.Tensor | None = None,
        return_attention: bool = False,
        stop_early: bool = False,
    ) -> tuple[PanFMOutput, list[torch.Tensor]]:
        """:meth:`forward`, also returning the (B, 1 + Lmax, C) outputs of the blocks in ``indices`` (the contract
        of :mod:`medfm.networks.blocks.trunk`: 0-based, negative counts from the end, in the order asked).
        ``stop_early`` runs only up to the deepest requested block (then without ``return_attention``, which reads
        the last block)."""
        wanted = self.blocks.resolve(indices)
        if stop_early and return_attention:
            raise ValueError("return_attention reads the last block: it cannot be combined with stop_early.")
        tokens, token_organ, masked = self.pack(images, present, organ_mask)
        valid = token_organ >= 0
        b = tokens.shape[0]
        x = torch.cat([self.cls_token.to(tokens.dtype).expand(b, -1, -1), tokens], dim=1)
        key_mask = None if bool(valid.all()) else torch.cat([valid.new_ones(b, 1), valid], dim=1)
        last_input = [self.num_layers - 2] if return_attention and self.num_layers > 1 else []
        h, kept = self.blocks(x, wanted + last_input, stop_early=stop_early, attn_mask=key_mask)
        attention = None
        if return_attention:
            # CLS -> token attention of the last block on its input: mean over heads, then the mean per token of
            # each organ, normalised over the present organs (a sum per organ would grow with its token count)
            cls_attn = self.blocks[-1].cls_attention(kept.pop() if last_input else x, key_mask)
            attention = organ_attention_share(cls_attn.mean(1)[:, 1:], token_organ, present)
        h = self.norm(h)
        return PanFMOutput(h[:, 0], h[:, 1:], token_organ, valid, masked, attention), kept

    def forward(
        self,
        images: Mapping[str, torch.Tensor],
        present: torch.Tensor,
        organ_mask: torch.Tensor | None = None,
        return_attention: bool = False,
    ) -> PanFMOutput:
        """
        Args:
            images: organ -> (B, in_channels, *organ_shape); rows of missing organs are never read, and an organ
                missing from the whole batch may be absent from the mapping.
            present: (B, O) bool, True = the subject has this organ; every subject needs at least one.
            organ_mask: (B, O) bool, True = hide this organ (its tokens become the mask token); ignored where
                the organ is missing. None hides nothing.
            return_attention: also compute ``organ_attention`` (B, O) from the last block.
        """
        return self.forward_intermediates(
            images, present=present, organ_mask=organ_mask, return_attention=return_attention
        )[0]


class _Branch(nn.Module):
    """Encoder + CLS head (+ a separate patch head)."""

    def __init__(self, encoder: PanFMEncoder, head: DINOHead, patch_head: DINOHead | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.patch_head = patch_head

    def project_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        return (self.head if self.patch_head is None else self.patch_head)(tokens)


class PanFMSelfDistill(EMATeacherPair):
    """Pan-FM pre-training pair: a student and its EMA teacher, iBOT/DINO style (iBOT: arXiv:2111.07832).

    ``student`` and ``teacher`` are :class:`PanFMEncoder` + :class:`DINOHead` (CLS) + a patch head; the teacher
    starts as a copy of the student, never requires grad, stays in eval mode (no stochastic depth) and moves
    only by :meth:`update_teacher`. The state dict holds both (``student.*``, ``teacher.*``) so a run resumes
    with its teacher; downstream models load the teacher's encoder (DINO's choice: the EMA weights), see
    :func:`panfm_encoder_state`. Give the optimiser ``model.student.parameters()``; under DDP wrap the whole pair
    with ``find_unused_parameters=True`` (see :class:`PanFMEncoder`; the frozen teacher is ignored by DDP).

    Teacher and student tokens align by construction: the packing depends on ``present`` only (a masked organ
    keeps its token slots), so for the same ``present`` token ``l`` of sample ``b`` is the same patch in both.

    Args:
        organs, organ_shapes: of the :class:`PanFMEncoder` (the arguments after them are keywords).
        out_dim: prototypes of the CLS head (DINO: 65536).
        patch_out_dim: prototypes of the patch head (iBOT: 8192).
        head_hidden_dim, head_bottleneck_dim, head_nlayers, norm_last_layer: of both :class:`DINOHead`.
        input_centering: in training mode, :meth:`forward_teacher` adds each batch to the encoders' running mean
            images, which the encoders subtract from their inputs (teacher and student share the same means).
        shared_head: one head for CLS and patch tokens (needs ``patch_out_dim == out_dim``); the default, our
            proposal, gives patch tokens their own head (as DINOv2's larger models), so the two objectives do
            not compete for one set of prototypes.
        encoder_kwargs: the other keywords of the :class:`PanFMEncoder` (``patch_size``, ``in_channels``,
            ``hidden_size``, ``num_layers``, ``num_heads``, ``mlp_dim``, ``qkv_bias``, ``pos_embed_scale``; ViT-B
            by default) and ``drop_path_rate``, here 0.1 by default (it acts in the student only).
    """

    def __init__(
        self,
        organs: Sequence[str],
        organ_shapes: Mapping[str, Sequence[int]],
        *,
        input_centering: bool = False,
        out_dim: int = 65536,
        patch_out_dim: int = 8192,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        head_nlayers: int = 3,
        norm_last_layer: bool = True,
        shared_head: bool = False,
        **encoder_kwargs: Any,
    ) -> None:
        super().__init__()
        if shared_head and patch_out_dim != out_dim:
            raise ValueError(f"shared_head needs patch_out_dim == out_dim, got {patch_out_dim} and {out_dim}.")
        encoder = PanFMEncoder(organs, organ_shapes, **{"drop_path_rate": 0.1, **encoder_kwargs})
        hidden_size = encoder.hidden_size
        head_kw: dict[str, Any] = {
            "hidden_dim": head_hidden_dim, "bottleneck_dim": head_bottleneck_dim, "nlayers": head_nlayers,
            "norm_last_layer": norm_last_layer,
        }  # fmt: skip
        head = DINOHead(hidden_size, out_dim, **head_kw)
        patch_head = None if shared_head else DINOHead(hidden_size, patch_out_dim, **head_kw)
        self.organs = encoder.organs
        self.input_centering = input_centering
        self.student = _Branch(encoder, head, patch_head)
        self.init_teacher()

    @torch.no_grad()
    def forward_teacher(self, images: Mapping[str, torch.Tensor], present: torch.Tensor) -> dict[str, torch.Tensor]:
        """Teacher on every present organ, without gradient. With ``input_centering``, in training mode, the
        images first update the mean images of both encoders (:meth:`PanFMEncoder.update_input_mean`).

        Returns:
            ``cls_logits`` (B, out_dim), ``tokens`` (B, Lmax, C) (project the wanted ones with
            :meth:`teacher_patch_logits`), ``token_organ``, ``valid`` (B, Lmax), ``organ_attention`` (B, O).
        """
        if self.input_centering and self.training:
            self.teacher.encoder.update_input_mean(images, present)
            for name, buf in self.teacher.encoder.named_buffers():
                if name.startswith("input_"):
                    self.student.encoder.get_buffer(name).copy_(buf)
        out = self.teacher.encoder(images, present, return_attention=True)
        return {
            "cls_logits": self.teacher.head(out.cls),
            "tokens": out.tokens,
            "token_organ": out.token_organ,
            "valid": out.valid,
            "organ_attention": out.organ_attention,
        }

    @torch.no_grad()
    def teacher_patch_logits(self, tokens: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
        """Teacher patch-head logits (M, patch_out_dim) of ``tokens[select]`` (row-major order, as the student's).

        Args:
            tokens: (B, Lmax, C) teacher tokens from :meth:`forward_teacher`.
            select: (B, Lmax) bool, e.g. the student's ``masked``.
        """
        return self.teacher.project_patches(tokens[select])

    def forward_student(
        self, images: Mapping[str, torch.Tensor], present: torch.Tensor, organ_mask: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Student on the masked view.

        Returns:
            ``cls_logits`` (B, out_dim); ``patch_logits`` (M, patch_out_dim) for the M masked tokens in row-major
            (b, l) order; ``masked``, ``valid`` (B, Lmax) bool; ``token_organ`` (B, Lmax).
        """
        out = self.student.encoder(images, present, organ_mask)
        return {
            "cls_logits": self.student.head(out.cls),
            "patch_logits": self.student.project_patches(out.tokens[out.masked]),
            "masked": out.masked,
            "valid": out.valid,
            "token_organ": out.token_organ,
        }

    def forward(
        self, images: Mapping[str, torch.Tensor], present: torch.Tensor, organ_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """:meth:`forward_student` (the pass that trains goes through ``forward``, so DDP syncs its gradients)."""
        return self.forward_student(images, present, organ_mask)


def panfm_encoder_state(state_dict: Mapping[str, Any], branch: str = "teacher") -> dict[str, Any]:
    """Key filter: the :class:`PanFMEncoder` weights of a :class:`PanFMSelfDistill` state dict (``<branch>.encoder.``
    prefix removed). Downstream uses the teacher (DINO); ``branch="student"`` takes the student's."""
    if branch not in ("teacher", "student"):
        raise ValueError(f"branch must be 'teacher' or 'student', got {branch!r}.")
    prefix = f"{branch}.encoder."
    out = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        raise KeyError(f"no '{prefix}*' weights in the state dict (first keys: {list(state_dict)[:5]}).")
    return out
