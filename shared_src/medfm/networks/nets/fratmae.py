"""FratMAE: Cross-Fraternal Twin Masked Autoencoder for PET/CT."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from medfm.masking import TokenMask
from medfm.networks.blocks import MAEDecoder, TextEncoder, load_clip_text_weights
from medfm.networks.blocks.twin_encoder import MODALITIES, twin_vit_encoders

__all__ = ["FratMAE", "MODALITIES"]


class FratMAE(nn.Module):
    """Cross-Fraternal Twin Masked Autoencoder (Oh et al., "Developing a PET/CT Foundation Model for
    Cross-Modal Anatomical and Functional Imaging", arXiv:2503.02824).

    Two ViT encoders (PET, CT) and two MAE decoders. The paper's ablations are switches:

    - ``cross_modal=True`` (FratMAE): the decoder of the masked modality S cross-attends to the other
      modality's encoded tokens (query = S, key/value = the other). ``False`` (plain MAE per modality): the
      decoders have no cross-attention sub-layer at all.
    - ``context_align=True``: a CLIP-architecture text encoder embeds the metadata prompt and the PET CLS
      token is projected into the same space for the InfoNCE loss (ContextAlign).

    Masks are drawn outside (a PrepareBatch, or the caller) and passed in; masked tokens never enter an
    encoder. The loss lives in :class:`medfm.losses.FratMAELoss`.

    Args:
        in_channels: channels per modality image (the arguments after it are keywords).
        decoder_hidden_size, decoder_num_layers, decoder_num_heads, decoder_mlp_dim: decoder size
            (MAE's 512, 8, 16, 2048).
        cross_modal: FratMAE's cross-attention decoders (True) or independent MAE decoders (False).
        context_align: add the text encoder and the PET/text embeddings for InfoNCE.
        text_vocab_size: size of the prompt tokenizer's vocabulary (``PromptTokenizer.vocab_size``).
        text_eot_id: the tokenizer's end-of-text id.
        text_context_length, text_width, text_num_layers, text_num_heads: text encoder (CLIP ViT-B text:
            77 positions, 512, 12, 8; the prompt needs about 16 positions).
        embed_dim: width of the joint PET/text space (CLIP ViT-B: 512).
        clip_text_weights: optional path of local CLIP weights for the text encoder (never downloaded).
        qkv_bias: bias on q, k, v (encoders and decoders).
        encoder_kwargs: size of the twin encoders, keywords of :class:`~medfm.networks.blocks.ViTEncoder`:
            ``patch_size``, ``hidden_size``, ``num_layers``, ``num_heads``, ``mlp_dim`` (ViT-B defaults: 16, 768,
            12, 12, 3072), ``drop_path_rate`` (0), ``spatial_dims`` (3).
    """

    def __init__(
        self,
        in_channels: int = 1,
        *,
        decoder_hidden_size: int = 512,
        decoder_num_layers: int = 8,
        decoder_num_heads: int = 16,
        decoder_mlp_dim: int = 2048,
        cross_modal: bool = True,
        context_align: bool = True,
        text_vocab_size: int = 288,
        text_eot_id: int = 2,
        text_context_length: int = 32,
        text_width: int = 512,
        text_num_layers: int = 12,
        text_num_heads: int = 8,
        embed_dim: int = 512,
        clip_text_weights: str | None = None,
        qkv_bias: bool = True,
        **encoder_kwargs: Any,
    ) -> None:
        super().__init__()
        self.cross_modal = cross_modal
        self.context_align = context_align
        self.in_channels = in_channels
        self.encoders = twin_vit_encoders(in_channels=in_channels, qkv_bias=qkv_bias, **encoder_kwargs)
        hidden_size = self.encoders["pet"].hidden_size
        self.patch_size = self.encoders["pet"].patch_size
        self.patch_dim = in_channels * math.prod(self.patch_size)
        self.decoders = nn.ModuleDict(
            {
                m: MAEDecoder(
                    encoder_size=hidden_size, patch_dim=self.patch_dim, hidden_size=decoder_hidden_size,
                    num_layers=decoder_num_layers, num_heads=decoder_num_heads, mlp_dim=decoder_mlp_dim,
                    cross_attention=cross_modal, qkv_bias=qkv_bias,
                )
                for m in MODALITIES
            }
        )
        self.text_encoder: TextEncoder | None = None
        self.image_projection: nn.Linear | None = None
        if context_align:
            self.text_encoder = TextEncoder(
                vocab_size=text_vocab_size, eot_id=text_eot_id, context_length=text_context_length, width=text_width,
                num_layers=text_num_layers, num_heads=text_num_heads, output_dim=embed_dim,
            )
            self.image_projection = nn.Linear(hidden_size, embed_dim, bias=False)
            nn.init.normal_(self.image_projection.weight, std=hidden_size**-0.5)
            if clip_text_weights:
                load_clip_text_weights(self.text_encoder, clip_text_weights)

    def no_weight_decay(self) -> set[str]:
        names = set()
        for m in MODALITIES:
            names |= {f"encoders.{m}.{n}" for n in self.encoders[m].no_weight_decay()}
            names |= {f"decoders.{m}.{n}" for n in self.decoders[m].no_weight_decay()}
        return names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for enc in self.encoders.values():
            enc.set_grad_checkpointing(enable)

    def forward_features(self, pet: torch.Tensor, ct: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unmasked encoding for downstream use: ``pet_tokens``/``ct_tokens`` (B, 1 + N, hidden_size)."""
        return {f"{m}_tokens": self.encoders[m](x)["tokens"] for m, x in zip(MODALITIES, (pet, ct))}

    def forward(
        self,
        pet: torch.Tensor,
        ct: torch.Tensor,
        masks: Mapping[str, TokenMask | None] | None = None,
        text_tokens: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            pet: (B, C, *spatial) PET, spatial sizes multiples of the patch size.
            ct: (B, C, *spatial) CT on the same grid.
            masks: ``{"pet": TokenMask | None, "ct": TokenMask | None}``; a modality with a mask is
                reconstructed. With ``cross_modal=True`` a masked modality's partner must be unmasked
                (FratMAE's asymmetric masking). None reconstructs nothing.
            text_tokens: (B, L) prompt token ids, required with ``context_align=True``.

        Returns:
            for each masked modality m: ``{m}_pred`` (B, N, patch_dim) predictions for every token (raster
            order) and ``{m}_mask`` (B, N) bool, True = masked; always ``pet_cls`` (B, hidden_size); with
            ContextAlign ``image_embed`` and ``text_embed`` (B, embed_dim), not normalised.
        """
        if pet.shape != ct.shape:
            raise ValueError(f"PET and CT batches must have one shape, got {tuple(pet.shape)} and {tuple(ct.shape)}.")
        masks = dict(masks or {})
        unknown = set(masks) - set(MODALITIES)
        if unknown:
            raise ValueError(f"masks for unknown modalities {sorted(unknown)}; expected {list(MODALITIES)}.")
        images = {"pet": pet, "ct": ct}
        feats: dict[str, torch.Tensor] = {}
        for m in MODALITIES:
            ids_keep = None if masks.get(m) is None else masks[m].ids_keep
            feats[m], _ = self.encoders[m].forward_intermediates(images[m], ids_keep=ids_keep)
        grid = self.encoders["pet"].token_grid(pet)
        out: dict[str, torch.Tensor] = {"pet_cls": feats["pet"][:, 0]}
        for m in MODALITIES:
            mk = masks.get(m)
            if mk is None:
                continue
            context = None
            if self.cross_modal:
                other = MODALITIES[1 - MODALITIES.index(m)]
                if masks.get(other) is not None:
                    raise ValueError(
                        f"cross-modal decoding of {m} needs {other} unmasked (asymmetric masking), "
                        "but both were masked."
                    )
                context = feats[other]
            out[f"{m}_pred"] = self.decoders[m](feats[m], grid, mk.ids_restore, context)
            out[f"{m}_mask"] = mk.mask
        if self.text_encoder is not None and self.image_projection is not None:
            if text_tokens is None:
                raise ValueError("context_align=True needs the prompt tokens (text_tokens).")
            out["image_embed"] = self.image_projection(out["pet_cls"])
            out["text_embed"] = self.text_encoder(text_tokens)
        return out
