"""CLIP-architecture text transformer that needs no download, with loading of local CLIP text weights."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
import torch.nn as nn

from .transformer_block import TransformerBlock

__all__ = ["TextEncoder", "filter_clip_text_state_dict", "load_clip_text_weights"]

logger = logging.getLogger(__name__)


class TextEncoder(nn.Module):
    """The text tower of CLIP (Radford et al., arXiv:2103.00020): token + position embedding, causal
    pre-norm transformer, final LayerNorm, the feature at the end-of-text token, linear projection.

    FratMAE's ContextAlign encodes the metadata prompt with CLIP's ViT-B text encoder (width 512, 12 layers,
    8 heads, QuickGELU). Here it starts untrained (CLIP's initialisation) and is trained with the image
    model; :func:`load_clip_text_weights` fills it from a local CLIP checkpoint when a user has one.

    Args:
        vocab_size: token ids in ``[0, vocab_size)`` (see :class:`medfm.transforms.PromptTokenizer`).
        eot_id: id of the end-of-text token, whose output is the text feature.
        context_length: token positions.
        width: transformer width (CLIP ViT-B: 512).
        num_layers: blocks (12).
        num_heads: heads (8).
        output_dim: projection width (CLIP ViT-B: 512).
        act: MLP activation; CLIP's OpenAI weights use ``quick_gelu``.
    """

    def __init__(
        self,
        vocab_size: int,
        eot_id: int,
        context_length: int = 32,
        width: int = 512,
        num_layers: int = 12,
        num_heads: int = 8,
        output_dim: int = 512,
        act: str = "quick_gelu",
    ) -> None:
        super().__init__()
        if not 0 <= eot_id < vocab_size:
            raise ValueError(f"eot_id={eot_id} must lie in [0, vocab_size={vocab_size}).")
        self.eot_id = eot_id
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList(
            TransformerBlock(width, num_heads, 4 * width, causal=True, act=act, norm_eps=1e-5)
            for _ in range(num_layers)
        )
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        # CLIP's initialisation.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std = width**-0.5
        proj_std = attn_std * (2 * num_layers) ** -0.5
        for blk in self.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=attn_std)
            nn.init.normal_(blk.attn.proj.weight, std=proj_std)
            nn.init.normal_(blk.mlp.fc1.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(blk.mlp.fc2.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=attn_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """
        Args:
            tokens: (B, L) long, L <= context_length, each row holding one end-of-text token.

        Returns:
            text features (B, output_dim), taken at each row's end-of-text position.
        """
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"tokens must be (B, L<={self.context_length}), got {tuple(tokens.shape)}.")
        is_eot = tokens == self.eot_id
        if not bool(is_eot.any(dim=1).all()):
            raise ValueError("every prompt needs an end-of-text token; encode prompts with the PromptTokenizer.")
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]].to(
            self.token_embedding.weight.dtype
        )
        for blk in self.blocks:
            x = blk(x)
        x = self.ln_final(x)
        eot = is_eot.int().argmax(dim=1)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        return x @ self.text_projection.to(x.dtype)


def filter_clip_text_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a CLIP text tower's tensors to :class:`TextEncoder` names (pure key mapping).

    Accepts OpenAI CLIP's state dict (``transformer.resblocks.{i}.attn.in_proj_weight`` …) and Hugging
    Face ``CLIPTextModelWithProjection``'s (``text_model.encoder.layers.{i}.self_attn.q_proj.weight`` …,
    q/k/v concatenated). Image-tower and unknown keys are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    if "positional_embedding" in state or any(k.startswith("transformer.resblocks.") for k in state):
        ren = {
            "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
            "attn.out_proj.weight": "attn.proj.weight", "attn.out_proj.bias": "attn.proj.bias",
            "ln_1.weight": "norm1.weight", "ln_1.bias": "norm1.bias",
            "ln_2.weight": "norm2.weight", "ln_2.bias": "norm2.bias",
            "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
            "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
        }  # fmt: skip
        for k, v in state.items():
            if k in ("token_embedding.weight", "positional_embedding", "text_projection") or k.startswith("ln_final."):
                out[k] = v
            elif k.startswith("transformer.resblocks."):
                i, rest = k[len("transformer.resblocks.") :].split(".", 1)
                if rest in ren:
                    out[f"blocks.{i}.{ren[rest]}"] = v
        return out
    pre = "text_model."
    ren_hf = {
        "self_attn.out_proj.weight": "attn.proj.weight", "self_attn.out_proj.bias": "attn.proj.bias",
        "layer_norm1.weight": "norm1.weight", "layer_norm1.bias": "norm1.bias",
        "layer_norm2.weight": "norm2.weight", "layer_norm2.bias": "norm2.bias",
        "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
        "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
    }  # fmt: skip
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if k == pre + "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif k == pre + "embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif k.startswith(pre + "final_layer_norm."):
            out["ln_final." + k.rsplit(".", 1)[1]] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.t()
        elif k.startswith(pre + "encoder.layers."):
            i, rest = k[len(pre + "encoder.layers.") :].split(".", 1)
            if rest in ren_hf:
                out[f"blocks.{i}.{ren_hf[rest]}"] = v
            elif rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, proj, kind = rest.split(".")
                qkv.setdefault((i, kind), {})[proj] = v
    for (i, kind), parts in qkv.items():
        if len(parts) == 3:
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], 0)
    return out


def load_clip_text_weights(encoder: TextEncoder, path: str | os.PathLike) -> dict[str, list[str]]:
    """Copy a local CLIP checkpoint's text tower into ``encoder`` where names and shapes agree.

    The positional embedding is cut to ``encoder.context_length``. The token embedding loads only if the
    vocabulary sizes agree (a CLIP BPE embedding does not fit the prompt tokenizer's ids). Nothing is
    downloaded: ``path`` is a ``.pt``/``.pth``/``.bin`` state dict (or a dict holding ``state_dict``).

    Returns:
        ``{"loaded": [...], "skipped": [...]}`` — tensor names taken, and names skipped with the reason.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP text weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    mapped = filter_clip_text_state_dict(state)
    if not mapped:
        raise ValueError(f"{path} holds no CLIP text-tower tensors (neither OpenAI nor Hugging Face names).")
    own = encoder.state_dict()
    loaded, skipped = [], []
    for k, v in mapped.items():
        if k == "positional_embedding" and v.shape[0] >= encoder.context_length:
            v = v[: encoder.context_length]
        if k in own and own[k].shape == v.shape:
            own[k] = v.to(own[k].dtype)
            loaded.append(k)
        else:
            skipped.append(f"{k}: shape {tuple(v.shape)} vs {tuple(own[k].shape) if k in own else 'absent'}")
    encoder.load_state_dict(own)
    logger.info("CLIP text weights from %s: %d tensors loaded, %d skipped", path, len(loaded), len(skipped))
    return {"loaded": loaded, "skipped": skipped}
