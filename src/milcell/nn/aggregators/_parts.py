"""Blocks shared by the ``dtfd``, ``acmil``, ``additive`` and ``class_attention`` aggregators (internal).

All of them keep the :class:`~milcell.nn.pooling.MILPooling` guarantees: exact zeros at masked
positions, float32 softmaxes, and no value read on the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milcell._validation import check_int
from milcell.nn.pooling import masked_softmax

__all__ = ["AttentionScorer", "labelled_cross_entropy", "reduction", "rowwise_softmax", "zero_masked"]


class AttentionScorer(nn.Module):
    """Attention scores ``W tanh(V h)`` (``* sigmoid(U h)`` when gated), ``K`` per instance.

    Maps ``(..., F)`` to ``(..., K)``; the attention network of Ilse et al. (2018) with ``K``
    outputs.
    """

    def __init__(self, in_dim: int, hidden: int, outputs: int, dropout: float, gated: bool) -> None:
        super().__init__()
        self.v = nn.Linear(in_dim, hidden)
        self.u = nn.Linear(in_dim, hidden) if gated else None
        self.w = nn.Linear(hidden, outputs)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        a = torch.tanh(self.v(h))
        if self.u is not None:
            a = a * torch.sigmoid(self.u(h))
        return self.w(self.dropout(a))


def reduction(in_dim: int, dim: int | None) -> tuple[nn.Module, int]:
    """The instance feature reduction ``Linear(in_dim, dim) + ReLU`` and its width (identity for ``None``)."""
    if dim is None:
        return nn.Identity(), in_dim
    width = check_int(dim, "dim", low=1)
    return nn.Sequential(nn.Linear(in_dim, width), nn.ReLU()), width


def zero_masked(h: Tensor, mask: Tensor) -> Tensor:
    """``h`` ``(B, N, F)`` with exact zeros where ``mask`` ``(B, N)`` is False."""
    return torch.where(mask.unsqueeze(-1), h, torch.zeros((), dtype=h.dtype, device=h.device))


def rowwise_softmax(scores: Tensor, member: Tensor) -> Tensor:
    """Masked float32 softmax of ``scores`` ``(B, K, N)`` over ``N``, separately for each of the ``K`` rows.

    Only the positions where ``member`` ``(B, K, N)`` is True take part; a row of ``member``
    without any True entry gives all-zero weights (not NaN).
    """
    b, k, n = scores.shape
    nonempty = member.any(dim=-1, keepdim=True)
    # an empty row is softmaxed over a harmless stand-in (its first position), then zeroed
    first = torch.arange(n, device=member.device) == 0
    safe = member | (first & ~nonempty)  # torch.where(nonempty, member, first); no bool Where (ONNX Runtime)
    w = masked_softmax(scores.reshape(b * k, n), safe.reshape(b * k, n)).view(b, k, n)
    return torch.where(nonempty, w, 0.0)


def labelled_cross_entropy(logits: Tensor, labels: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean float32 cross-entropy of ``logits`` ``(B, K, C)``, each of bag ``b``'s rows against ``labels[b]``.

    Rows where ``valid`` ``(B, K)`` is False and bags labelled ``-1`` are left out; with nothing
    left the result is a zero that keeps the graph. Nothing is read on the host.
    """
    b, k, c = logits.shape
    labels = labels.to(device=logits.device, dtype=torch.long)
    keep = (labels >= 0).unsqueeze(1).expand(b, k)
    if valid is not None:
        keep = keep & valid
    target = labels.clamp_min(0).unsqueeze(1).expand(b, k)
    ce = F.cross_entropy(logits.float().reshape(b * k, c), target.reshape(b * k), reduction="none")
    ce = torch.where(keep.reshape(b * k), ce, 0.0)
    return ce.sum() / keep.sum().clamp_min(1).float()
