"""Soft vector quantizer of the SPAD-VT tokenizer: each token is a probability-weighted mix of codebook entries."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .code_usage import token_entropy, usage_entropy_loss

__all__ = ["SoftQuantizer", "SoftQuantizerOutput"]


class SoftQuantizerOutput(NamedTuple):
    """What :class:`SoftQuantizer` returns (a tuple, so DDP and ``torch.compile`` see plain tensors).

    Attributes:
        z_q: (N, code_dim, D, H, W) quantized features, ``probs @ codebook``, channel-first.
        logits: (N, D, H, W, K) code logits, channel-last (the MIM targets of SPAD-ViT are ``softmax(logits)``).
        probs: (N, D, H, W, K) float32 code probabilities.
        usage_loss: scalar ``sum_k pbar_k log pbar_k``, pbar the mean of ``probs`` over all tokens of the batch
            (over all DDP ranks while training).
        token_entropy: scalar mean over tokens of ``H(p)``.
    """

    z_q: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor
    usage_loss: torch.Tensor
    token_entropy: torch.Tensor


class SoftQuantizer(nn.Module):
    """Soft quantizer (SPAD-Nets, arXiv:2312.07630; PUMIT ``VectorQuantizer(mode="soft")``).

    ``logits = proj(z)`` over channels, ``p = softmax(logits)``, ``z_q = p @ E`` with the codebook ``E``
    (K x code_dim). Parameter names follow the reference (``proj.{weight,bias}``, ``embedding.weight``) so its
    checkpoints load unchanged; the codebook starts uniform in ±1/K as there.

    Args:
        in_channels: channels of the encoder output.
        num_codes: codebook size K.
        code_dim: dimension of each code (channels of ``z_q``).
    """

    def __init__(self, in_channels: int = 512, num_codes: int = 1024, code_dim: int = 512) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("num_codes", num_codes), ("code_dim", code_dim)):
            if v < 1:
                raise ValueError(f"{name} must be positive, got {v}.")
        self.proj = nn.Linear(in_channels, num_codes)
        self.embedding = nn.Embedding(num_codes, code_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)

    @property
    def num_codes(self) -> int:
        return self.embedding.num_embeddings

    @property
    def code_dim(self) -> int:
        return self.embedding.embedding_dim

    def forward(self, z: torch.Tensor) -> SoftQuantizerOutput:
        """
        Args:
            z: (N, in_channels, D, H, W) encoder features (any number of spatial dims).
        """
        if z.ndim < 3 or z.shape[1] != self.proj.in_features:
            raise ValueError(f"expected (N, {self.proj.in_features}, *spatial) features, got {tuple(z.shape)}.")
        logits = self.proj(z.movedim(1, -1))
        probs = logits.float().softmax(-1)
        z_q = torch.matmul(probs.to(logits.dtype), self.embedding.weight.to(logits.dtype))
        z_q = z_q.movedim(-1, 1).contiguous()
        usage = usage_entropy_loss(probs, sync=self.training)
        return SoftQuantizerOutput(z_q, logits, probs, usage, token_entropy(logits))
