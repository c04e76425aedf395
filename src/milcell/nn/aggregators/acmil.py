"""ACMIL: attention-challenging MIL with multiple branches and stochastic top-k masking (Zhang et al., 2023).

Reference
---------
Yunlong Zhang, Honglin Li, Yuxuan Sun, Sunyi Zheng, Chenglu Zhu and Lin Yang (2023).
"Attention-Challenging Multiple Instance Learning for Whole Slide Image Classification".
arXiv:2311.07125; *European Conference on Computer Vision (ECCV)* 2024.

Examples
--------
>>> import torch
>>> from milcell.nn.pooling import create_pooling
>>> pool = create_pooling("acmil", 8, num_branches=3, dim=None).eval()
>>> out = pool.forward_aux(torch.randn(2, 6, 8), torch.ones(2, 6, dtype=torch.bool))
>>> out.embedding.shape, out.aux["branch_attention"].shape, out.aux["branch_logits"].shape
(torch.Size([2, 8]), torch.Size([2, 3, 6]), torch.Size([2, 3, 2]))
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from milcell._validation import check_int, check_real
from milcell.nn.aggregators._parts import (
    AttentionScorer,
    labelled_cross_entropy,
    reduction,
    rowwise_softmax,
    zero_masked,
)
from milcell.nn.pooling import (
    HiddenSizes,
    MILPooling,
    _check_dropout,
    _check_hidden,
    _no_autocast,
    register_pooling,
)

__all__ = ["ACMILPooling"]


@register_pooling("acmil")
class ACMILPooling(MILPooling):
    """ACMIL (Zhang et al., 2023): multiple branch attention and stochastic top-k instance masking.

    Yunlong Zhang, Honglin Li, Yuxuan Sun, Sunyi Zheng, Chenglu Zhu and Lin Yang (2023),
    "Attention-Challenging Multiple Instance Learning for Whole Slide Image Classification",
    arXiv:2311.07125, ECCV 2024.

    Attention MIL tends to put all its weight on a few very salient instances and over-fit to
    them. ACMIL challenges the attention in two ways. For a bag with ``n`` real instances, after
    the optional reduction ``h_i = ReLU(W x_i + b)`` (``dim``, default 128; identity when
    ``dim=None``):

    1. **Multiple branch attention (MBA).** One gated attention network with ``K =
       num_branches`` outputs scores every instance once per branch; branch ``k`` has its own
       float32 softmax ``a^k`` over the real instances, its own embedding ``z_k = sum_i a^k_i
       h_i`` and its own linear classifier (``C`` classes). The auxiliary loss ``"branch"`` is
       the mean cross-entropy of the ``K`` branch logits against the bag label, and
       ``"diversity"`` is the mean pairwise cosine similarity of the branches' attention vectors,
       which pushes the branches to attend to different instances (it needs no label and uses
       every bag; 0 for ``K = 1``).
    2. **Stochastic top-k instance masking (STKIM)**, in training only. In every branch, among
       its ``k' = min(top_k, n)`` highest-scoring real instances, ``floor(mask_rate * k')`` chosen
       uniformly at random (torch's global generator) are masked out of that branch's softmax.
       Since ``mask_rate < 1``, at least one real instance always stays. In eval nothing is
       masked and the pooling is deterministic.

    The bag attention is the mean of the branch attentions, ``a_i = (1/K) sum_k a^k_i`` (it sums
    to 1 over the bag), and the bag embedding is ``sum_i a_i h_i`` ``(B, F)``: the fusion head on
    top plays the part of the paper's bag classifier, so this pooling is embedding-level and
    clinical fusion heads work with it.

    The whole forward pass runs on the device (top-k, sorting, scatters; no data-dependent
    branch), so it never waits for it. In eval it is permutation-invariant, batch-independent
    and independent of ``N_max``.

    Parameters
    ----------
    in_dim : int
        Feature size ``D`` of the instances.
    num_classes : int, default 2
        Number of classes ``C`` of the branch classifiers (that of the task).
    num_branches : int, default 5
        ``K``, the number of attention branches.
    top_k : int, default 10
        STKIM draws the masked instances among each branch's ``top_k`` highest-scoring ones;
        ``0`` turns STKIM off.
    mask_rate : float, default 0.6
        Fraction of those ``top_k`` masked in training, in ``[0, 1)``; ``0`` turns STKIM off.
    dim : int or None, default 128
        Width ``F`` of the instance reduction ``Linear + ReLU`` (the paper's dimension reduction
        before the attention); ``None``: no reduction, ``F = D``. ``out_dim == F``.
    hidden : int or tuple of one int, default 128
        Hidden size of the gated attention network.
    dropout : float, default 0.0
        Dropout on the attention network's hidden activations.
    branch_loss_weight : float, default 1.0
        Weight of the auxiliary loss ``"branch"`` (``aux_loss_weights``).
    diversity_loss_weight : float, default 1.0
        Weight of the auxiliary loss ``"diversity"`` (``aux_loss_weights``).

    Attributes
    ----------
    aux_loss_weights : dict of str to float
        ``{"branch": branch_loss_weight, "diversity": diversity_loss_weight}``.

    Notes
    -----
    ``forward_aux(x, mask).aux`` holds ``"branch_attention"`` ``(B, K, N)`` float32 (0 at masked
    positions and at the instances STKIM masked), ``"branch_logits"`` ``(B, K, C)``.

    Examples
    --------
    >>> pool = ACMILPooling(4, num_branches=2, top_k=3, mask_rate=0.5)
    >>> x, mask = torch.randn(2, 5, 4), torch.tensor([[True] * 5, [True, False, False, False, False]])
    >>> out = pool.forward_aux(x, mask)  # training mode: one of the top 3 masked in each branch
    >>> (out.aux["branch_attention"][0] == 0).sum(dim=1).tolist()
    [1, 1]
    >>> out.aux["branch_attention"][1, :, 0].tolist()  # a bag of one is never masked
    [1.0, 1.0]
    >>> {k: v.shape for k, v in pool.auxiliary_losses(out.aux, torch.tensor([1, 0])).items()}
    {'branch': torch.Size([]), 'diversity': torch.Size([])}
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int = 2,
        num_branches: int = 5,
        top_k: int = 10,
        mask_rate: float = 0.6,
        dim: int | None = 128,
        hidden: HiddenSizes = 128,
        dropout: float = 0.0,
        branch_loss_weight: float = 1.0,
        diversity_loss_weight: float = 1.0,
    ) -> None:
        super().__init__(in_dim)
        self.num_classes = check_int(num_classes, "num_classes", low=2)
        self.num_branches = check_int(num_branches, "num_branches", low=1)
        self.top_k = check_int(top_k, "top_k", low=0)
        self.mask_rate = check_real(mask_rate, "mask_rate", low=0.0, high=1.0, high_open=True)
        self.hidden = _check_hidden(hidden, length=1)[0]
        self.aux_loss_weights = {
            "branch": check_real(branch_loss_weight, "branch_loss_weight", low=0.0),
            "diversity": check_real(diversity_loss_weight, "diversity_loss_weight", low=0.0),
        }
        # floor(mask_rate * k') for every k' = 0 .. top_k, computed exactly on the host once
        drops = [int(k * self.mask_rate) for k in range(self.top_k + 1)]
        self.drop_counts: Tensor
        self.register_buffer("drop_counts", torch.tensor(drops, dtype=torch.long), persistent=False)
        self.reduce, width = reduction(self.in_dim, dim)
        self.out_dim = width
        self.attention = AttentionScorer(
            width, self.hidden, self.num_branches, _check_dropout(dropout), gated=True
        )
        bound = 1.0 / math.sqrt(width)  # nn.Linear's initialisation, one classifier per branch
        self.branch_weight = nn.Parameter(
            torch.empty(self.num_branches, self.num_classes, width).uniform_(-bound, bound)
        )
        self.branch_bias = nn.Parameter(
            torch.empty(self.num_branches, self.num_classes).uniform_(-bound, bound)
        )

    def masked_top_k(self, scores: Tensor, mask: Tensor) -> Tensor:
        """The instances STKIM masks out of each branch: ``(B, K, N)`` bool (all False in eval).

        ``scores`` ``(B, K, N)`` are the branch scores, ``mask`` ``(B, N)`` the real instances.
        """
        b, k, n = scores.shape
        top = min(self.top_k, n)
        if not self.training or top == 0 or self.mask_rate == 0.0:
            return torch.zeros(b, k, n, dtype=torch.bool, device=mask.device)
        real = mask.unsqueeze(1).expand(b, k, n)
        ranked = torch.where(real, scores.detach().float(), float("-inf")).topk(top, dim=-1).indices
        available = mask.sum(dim=1).clamp_max(top)  # k' = min(top_k, n), per bag
        drop = self.drop_counts[available]  # floor(mask_rate * k') < k': >= 1 instance stays
        valid = torch.arange(top, device=mask.device) < available.view(b, 1, 1)  # (B, 1, top)
        key = torch.where(valid, torch.rand(b, k, top, device=mask.device), 2.0)
        order = key.argsort(dim=-1).argsort(dim=-1)  # rank of each top-k entry's random key
        chosen = order < drop.view(b, 1, 1)
        return torch.zeros(b, k, n, dtype=torch.bool, device=mask.device).scatter(-1, ranked, chosen)

    def _pool_aux(
        self, x: Tensor, mask: Tensor, clinical: Tensor | None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        h = zero_masked(self.reduce(x), mask)  # (B, N, F)
        scores = self.attention(h).transpose(1, 2)  # (B, K, N)
        member = mask.unsqueeze(1) & ~self.masked_top_k(scores, mask)
        branch_attention = rowwise_softmax(scores, member)  # (B, K, N) float32
        z = torch.bmm(branch_attention.to(h.dtype), h)  # (B, K, F)
        branch_logits = torch.einsum("bkf,kcf->bkc", z, self.branch_weight.to(z.dtype)) + self.branch_bias.to(
            z.dtype
        )
        attention = branch_attention.mean(dim=1)  # (B, N)
        embedding = torch.bmm(attention.unsqueeze(1).to(h.dtype), h).squeeze(1)
        aux = {"branch_attention": branch_attention, "branch_logits": branch_logits}
        return embedding, attention, aux

    def auxiliary_losses(self, aux: Mapping[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        """The unweighted branch and diversity losses.

        Parameters
        ----------
        aux : mapping of str to Tensor
            ``forward_aux(...).aux`` of this pooling.
        labels : Tensor
            ``(B,)`` int64 bag labels, ``-1`` = unlabelled (left out of ``"branch"``).

        Returns
        -------
        dict of str to Tensor
            Float32 scalars: ``"branch"``, the mean cross-entropy of every branch's logits of the
            labelled bags (0, graph kept, when none is labelled); ``"diversity"``, the mean over
            bags and branch pairs of the cosine similarity of two branches' attention vectors
            (0 for one branch).

        Examples
        --------
        >>> pool = ACMILPooling(4, num_branches=3).eval()
        >>> out = pool.forward_aux(torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool))
        >>> 0.0 < pool.auxiliary_losses(out.aux, torch.tensor([0, 1]))["diversity"].item() <= 1.0
        True
        """
        logits = aux["branch_logits"]
        attention = aux["branch_attention"]
        k = logits.shape[1]
        branch = labelled_cross_entropy(logits, labels)
        with _no_autocast(attention.device):
            unit = attention.float() / attention.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
            gram = torch.bmm(unit, unit.transpose(1, 2))  # (B, K, K)
            off_diagonal = ~torch.eye(k, dtype=torch.bool, device=gram.device)
            pairs = max(k * (k - 1), 1)
            diversity = torch.where(off_diagonal, gram, 0.0).sum(dim=(1, 2)).mean() / pairs
        return {"branch": branch, "diversity": diversity}

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_classes={self.num_classes}, num_branches={self.num_branches}, "
            f"top_k={self.top_k}, mask_rate={self.mask_rate}, hidden={self.hidden}"
        )
