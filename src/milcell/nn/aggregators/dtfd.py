"""DTFD-MIL: double-tier feature distillation over random pseudo-bags (Zhang et al., 2022).

Reference
---------
Hongrun Zhang, Yanda Meng, Yitian Zhao, Yihong Qiao, Xiaoyun Yang, Sarah E. Coupland and
Yalin Zheng (2022). "DTFD-MIL: Double-Tier Feature Distillation Multiple Instance Learning for
Histopathology Whole Slide Image Classification". *Proceedings of the IEEE/CVF Conference on
Computer Vision and Pattern Recognition (CVPR)*, pp. 18802-18812.

Examples
--------
>>> import torch
>>> from milcell.nn.pooling import create_pooling
>>> pool = create_pooling("dtfd", 8, num_pseudo_bags=3, distill="maxmins", dim=16).eval()
>>> out = pool.forward_aux(torch.randn(2, 7, 8), torch.tensor([[True] * 7, [True, True] + [False] * 5]))
>>> out.embedding.shape, out.aux["tier1_logits"].shape, out.aux["pseudo_bag_mask"].tolist()
(torch.Size([2, 16]), torch.Size([2, 3, 2]), [[True, True, True], [True, True, False]])
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milcell._validation import check_choice, check_int, check_real
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
    _lexicographic_rank,
    masked_softmax,
    register_pooling,
)

__all__ = ["DTFDPooling"]

DISTILL = ("afs", "maxs", "maxmins")


@register_pooling("dtfd")
class DTFDPooling(MILPooling):
    """DTFD-MIL (Zhang et al., 2022): tier-1 attention over random pseudo-bags, tier-2 over their distillates.

    Hongrun Zhang, Yanda Meng, Yitian Zhao, Yihong Qiao, Xiaoyun Yang, Sarah E. Coupland and
    Yalin Zheng (2022), "DTFD-MIL: Double-Tier Feature Distillation Multiple Instance Learning
    for Histopathology Whole Slide Image Classification", CVPR 2022.

    For a bag with ``n`` real instances, after the optional reduction ``h_i = ReLU(W x_i + b)``
    (``dim``, default 128; identity when ``dim=None``):

    1. **Pseudo-bags.** The real instances are split into ``M = num_pseudo_bags`` groups of
       near-equal size (sizes differ by at most one): each instance gets a rank ``0 .. n-1`` and
       joins pseudo-bag ``rank mod M``. In training the ranks come from a random permutation
       (a uniform key per instance drawn from torch's global generator, masked positions sorted
       last), a new split at every forward pass. In eval the ranks are the instances'
       lexicographic order (by ``x_i[0]``, then ``x_i[1]``, ...; identical instances are
       interchangeable), so the eval split depends only on the bag's content: the output is
       deterministic and permutation-invariant.
    2. **Tier 1.** Each pseudo-bag ``m`` is a bag of its own: gated attention weights
       ``a_i`` (float32 softmax over the pseudo-bag's instances), the pseudo-bag feature
       ``f_m = sum_i a_i h_i`` and tier-1 logits ``W_1 f_m + b_1`` (``C`` classes). Every
       pseudo-bag inherits the bag's label: the auxiliary loss ``"tier1"`` is the mean
       cross-entropy over the (labelled bag, non-empty pseudo-bag) pairs.
    3. **Instance probabilities** (the paper's Grad-CAM derivation for an attention model with a
       linear classifier): ``p_i = softmax_c(a_i W_1 h_i)`` (no bias), in float32.
    4. **Distillation** (``distill``): ``"afs"`` (aggregated feature selection) keeps ``f_m``;
       ``"maxs"`` keeps ``h_i`` of the pseudo-bag's instance with the highest score;
       ``"maxmins"`` keeps the highest- and the lowest-scoring instances (two tier-2 instances
       per pseudo-bag). The score of an instance is ``1 - p_i[0]``, the probability of any class
       but class 0 (for two classes, the positive-class probability of the paper; class 0 is
       taken as the negative, "normal" class), compared through its logit so that it does not
       saturate in float32. Exact ties go to the earliest position in training, to the
       instance first in the lexicographic order in eval.
    5. **Tier 2.** Gated attention over the distilled features (float32 softmax) gives the bag
       embedding ``(B, F)``; the fusion head on top plays the part of the paper's tier-2
       classifier, so this pooling is embedding-level and clinical fusion heads work with it.

    **Bags smaller than M.** A bag with ``n < M`` real instances has ``M - n`` empty
    pseudo-bags. They are excluded exactly: they get no tier-2 weight, no distilled feature and
    no tier-1 loss (``aux["pseudo_bag_mask"]`` says which exist); a bag of one instance is then a
    single pseudo-bag. Masked instances never join a pseudo-bag.

    The reported ``attention`` ``(B, N)`` is what the bag embedding draws from each instance:
    ``sum_m w_m a_i`` over the pseudo-bag containing ``i`` for ``"afs"`` (``w_m`` the tier-2
    weights), and the tier-2 weight of each selected instance for ``"maxs"`` / ``"maxmins"``
    (0 for the others). It sums to 1 over each bag. In eval, identical instances then share
    their total weight equally (which copy joins which pseudo-bag, or is selected, is a matter
    of their order only), so the attention too is permutation-equivariant.

    **Padding costs nothing on the CPU.** In eager mode on the CPU the per-instance layers (the
    reduction, the tier-1 attention network and ``W_1 h_i``) run on the real instances only,
    gathered into one ``(R, D)`` matrix (``R`` the number of real instances of the batch), and
    their results are scattered back; a padded position is never read. Elsewhere (an
    accelerator, where reading ``R`` would be a host-device sync, or under tracing or
    compiling) they run on the padded batch with the masked positions zeroed first, and the whole
    forward pass stays on the device (sorting, gathers, scatters; no data-dependent branch),
    so it never waits for it. Both give the same results; :attr:`pack_on_cpu` ``= False``
    forces the padded way. Training is stochastic (the split) and draws from torch's global
    generator; eval is deterministic.

    Parameters
    ----------
    in_dim : int
        Feature size ``D`` of the instances.
    num_classes : int, default 2
        Number of classes ``C`` of the tier-1 classifier (that of the task).
    num_pseudo_bags : int, default 4
        ``M``, the number of pseudo-bags each bag is split into.
    distill : {"afs", "maxs", "maxmins"}, default "afs"
        The feature distillation passed to tier 2.
    dim : int or None, default 128
        Width ``F`` of the instance reduction ``Linear + ReLU`` (the paper's dimension reduction
        before the attention); ``None``: no reduction, ``F = D``. ``out_dim == F``.
    hidden : int or tuple of one int, default 128
        Hidden size of both gated attention networks.
    dropout : float, default 0.0
        Dropout on the attention networks' hidden activations.
    tier1_loss_weight : float, default 1.0
        Weight of the auxiliary loss ``"tier1"`` in :meth:`MILModel.loss
        <milcell.nn.model.MILModel.loss>` (``aux_loss_weights``); ``0`` turns it off.

    Attributes
    ----------
    aux_loss_weights : dict of str to float
        ``{"tier1": tier1_loss_weight}``.
    pack_on_cpu : bool
        Class attribute, default ``True``: run the per-instance layers on the real instances only
        when eager on the CPU (see above); set it to ``False`` on an instance (or the class) to
        run them on the padded batch everywhere.

    Notes
    -----
    ``forward_aux(x, mask).aux`` holds ``"tier1_logits"`` ``(B, M, C)``, ``"pseudo_bag_mask"``
    ``(B, M)`` bool, ``"pseudo_bags"`` ``(B, N)`` long (the pseudo-bag of each instance, ``-1``
    at masked positions) and ``"instance_probs"`` ``(B, N, C)`` float32 (0 at masked
    positions).

    Examples
    --------
    >>> pool = DTFDPooling(6, num_pseudo_bags=2)
    >>> x = torch.randn(3, 5, 6)
    >>> mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] + [False] * 4])
    >>> out = pool.forward_aux(x, mask)
    >>> out.attention.sum(dim=1)
    tensor([1.0000, 1.0000, 1.0000], grad_fn=...)
    >>> out.aux["pseudo_bag_mask"][2].tolist()  # one instance: one pseudo-bag
    [True, False]
    >>> losses = pool.auxiliary_losses(out.aux, torch.tensor([1, 0, -1]))
    >>> sorted(losses), losses["tier1"].shape
    (['tier1'], torch.Size([]))
    """

    pack_on_cpu: bool = True

    def __init__(
        self,
        in_dim: int,
        num_classes: int = 2,
        num_pseudo_bags: int = 4,
        distill: str = "afs",
        dim: int | None = 128,
        hidden: HiddenSizes = 128,
        dropout: float = 0.0,
        tier1_loss_weight: float = 1.0,
    ) -> None:
        super().__init__(in_dim)
        self.num_classes = check_int(num_classes, "num_classes", low=2)
        self.num_pseudo_bags = check_int(num_pseudo_bags, "num_pseudo_bags", low=1)
        self.distill = check_choice(distill, "distill", DISTILL)
        self.hidden = _check_hidden(hidden, length=1)[0]
        drop = _check_dropout(dropout)
        self.aux_loss_weights = {"tier1": check_real(tier1_loss_weight, "tier1_loss_weight", low=0.0)}
        self.reduce, width = reduction(self.in_dim, dim)
        self.out_dim = width
        self.tier1_attention = AttentionScorer(width, self.hidden, 1, drop, gated=True)
        self.tier1_classifier = nn.Linear(width, self.num_classes)
        self.tier2_attention = AttentionScorer(width, self.hidden, 1, drop, gated=True)

    def _prepare(self, x: Tensor, mask: Tensor) -> Tensor:
        """Validate only: :meth:`_instance_layers` never lets a masked row reach a result.

        On the packed path it gathers the real rows alone; on the padded one it zeroes the masked
        positions first, as :meth:`MILPooling._prepare` does. Either way NaN/inf padding reaches
        neither the outputs nor any gradient, and the gradient of ``x`` is exactly 0 there.
        """
        self._validate(x, mask)
        return x

    def _packs(self, x: Tensor) -> bool:
        """Whether the instance layers run on the real rows only (eager CPU) or on the padded batch.

        Packing needs the number of real instances on the host: free on the CPU, a host-device
        sync on an accelerator, and a data-dependent shape that tracing or compiling would freeze.
        """
        if not self.pack_on_cpu or x.device.type != "cpu":
            return False
        if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
            return False
        # torch.compiler.is_compiling / is_exporting exist from torch 2.3 / 2.6 on
        return not any(getattr(torch.compiler, name, bool)() for name in ("is_compiling", "is_exporting"))

    def _instance_layers(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The per-instance layers: reduced features, tier-1 scores and class maps, masked rows zero.

        Returns ``h`` ``(B, N, F)``, the tier-1 attention scores ``(B, N)`` and ``h W_1^T``
        ``(B, N, C)``, each exactly 0 at masked positions; ``x`` may hold anything there. Packed
        (see :meth:`_packs`), the layers see the real rows only, gathered into ``(R, D)``, and
        their results are scattered back; padded, ``x`` is zeroed where masked first.
        """
        b, n = mask.shape
        if self._packs(x):
            rows = mask.reshape(-1).nonzero().squeeze(1)  # (R,) flat indices of the real instances
            hp = self.reduce(x.reshape(b * n, -1).index_select(0, rows))  # (R, F)
            sp = self.tier1_attention(hp)  # (R, 1)
            cp = F.linear(hp, self.tier1_classifier.weight)  # (R, C)

            def scatter(values: Tensor) -> Tensor:
                return values.new_zeros(b * n, values.shape[1]).index_copy(0, rows, values).view(b, n, -1)

            return scatter(hp), scatter(sp).squeeze(-1), scatter(cp)
        x = torch.where(mask.unsqueeze(-1), x, 0.0)
        h = zero_masked(self.reduce(x), mask)
        s1 = torch.where(mask, self.tier1_attention(h).squeeze(-1), 0.0)
        return h, s1, F.linear(h, self.tier1_classifier.weight)

    def pseudo_bags(self, x: Tensor, mask: Tensor) -> Tensor:
        """The pseudo-bag ``0 .. M-1`` of each instance, ``(B, N)`` long (``-1`` at masked positions).

        Random in training (torch's global generator), by lexicographic order of the instances in
        eval (see the class description). ``x`` must already be cleaned.

        Examples
        --------
        >>> pool = DTFDPooling(2, num_pseudo_bags=2).eval()
        >>> x = torch.tensor([[[3.0, 0.0], [1.0, 0.0], [2.0, 0.0], [9.0, 9.0]]])
        >>> pool.pseudo_bags(x, torch.tensor([[True, True, True, False]])).tolist()
        [[0, 0, 1, -1]]
        """
        return self._split(mask, None if self.training else self._content(x, mask))

    @staticmethod
    def _content(x: Tensor, mask: Tensor) -> Tensor:
        """``(B, N)`` long: lexicographic rank of real instances (shared by identical ones), else ``N``."""
        return torch.where(mask, _lexicographic_rank(x.detach()), mask.shape[1])

    def _split(self, mask: Tensor, content: Tensor | None) -> Tensor:
        """Pseudo-bag ids from a random order (``content=None``) or from the content order."""
        b, n = mask.shape
        if content is None:
            key = torch.where(mask, torch.rand(b, n, device=mask.device), 2.0)  # masked positions last
            order = torch.sort(key, dim=1, stable=True).indices
        else:
            order = torch.sort(content, dim=1, stable=True).indices
        positions = torch.arange(n, device=mask.device).expand(b, n)
        rank = torch.empty_like(order).scatter_(1, order, positions)
        return torch.where(mask, rank % self.num_pseudo_bags, -1)

    @staticmethod
    def _extreme(score: Tensor, member: Tensor, content: Tensor | None, largest: bool) -> Tensor:
        """``(B, M)``: the member of each pseudo-bag with the highest (lowest) ``score`` ``(B, M, N)``.

        Exact ties go to the earliest position in training and to the lowest content rank in eval
        (so that the eval choice does not depend on the order of the instances either: instances
        whose reduced features are equal, e.g. all zero after the ReLU, tie exactly).
        """
        fill = float("-inf") if largest else float("inf")
        masked = torch.where(member, score, fill)
        if content is None:
            return masked.argmax(dim=-1) if largest else masked.argmin(dim=-1)
        extreme = masked.amax(dim=-1, keepdim=True) if largest else masked.amin(dim=-1, keepdim=True)
        tied = member & (masked == extreme)
        key = torch.where(tied, content.unsqueeze(1), torch.iinfo(torch.long).max)
        return key.argmin(dim=-1)

    def _pool_aux(
        self, x: Tensor, mask: Tensor, clinical: Tensor | None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        b, n = mask.shape
        m_count = self.num_pseudo_bags
        h, s1, cam_raw = self._instance_layers(x, mask)  # (B, N, F), (B, N), (B, N, C); 0 where masked
        content = None if self.training else self._content(torch.where(mask.unsqueeze(-1), x, 0.0), mask)
        groups = self._split(mask, content)
        ids = torch.arange(m_count, device=mask.device).view(1, m_count, 1)
        member = groups.unsqueeze(1) == ids  # (B, M, N); masked positions (-1) belong to none
        nonempty = member.any(dim=-1)  # (B, M)

        # tier 1: attention within each pseudo-bag
        a1 = rowwise_softmax(s1.unsqueeze(1).expand(b, m_count, n), member)  # (B, M, N) float32
        feats = torch.bmm(a1.to(h.dtype), h)  # (B, M, F)
        tier1_logits = self.tier1_classifier(feats)  # (B, M, C)

        # instance probabilities p_i = softmax_c(a_i W_1 h_i) (each instance is in one pseudo-bag)
        a_inst = a1.sum(dim=1)  # (B, N)
        cam = cam_raw.float() * a_inst.unsqueeze(-1)
        probs = torch.where(mask.unsqueeze(-1), torch.softmax(cam, dim=-1), 0.0)  # (B, N, C)

        # distillation: the tier-2 instances (B, K, F), their existence (B, K) and instance weights
        if self.distill == "afs":
            distilled, present = feats, nonempty
        else:
            # rank by logit(1 - p_i[0]) = logsumexp_{c>0} cam_c - cam_0: the same order, no saturation
            score = torch.logsumexp(cam[..., 1:], dim=-1) - cam[..., 0]
            score = score.unsqueeze(1).expand(b, m_count, n)  # (B, M, N)
            picks = self._extreme(score, member, content, largest=True)  # (B, M)
            if self.distill == "maxmins":
                bottom = self._extreme(score, member, content, largest=False)
                picks = torch.cat([picks, bottom], dim=1)  # (B, 2M)
            distilled = h.gather(1, picks.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
            present = nonempty.repeat(1, picks.shape[1] // m_count)

        # tier 2: attention over the distilled features
        w2 = masked_softmax(self.tier2_attention(distilled).squeeze(-1), present)  # (B, K) float32
        embedding = torch.bmm(w2.unsqueeze(1).to(distilled.dtype), distilled).squeeze(1)
        if self.distill == "afs":
            attention = (w2.unsqueeze(-1) * a1).sum(dim=1)  # sum_m w_m a_{m,i}, float32
        else:
            attention = torch.zeros(b, n, device=mask.device).scatter_add_(1, picks, w2)
        if content is not None:  # identical instances share their weight: the order they come in is moot
            slots = torch.zeros(b, n + 1, device=mask.device)
            total = slots.scatter_add(1, content, attention).gather(1, content)
            count = slots.scatter_add(1, content, mask.float()).gather(1, content)
            attention = torch.where(mask, total / count.clamp_min(1.0), 0.0)
        aux = {
            "tier1_logits": tier1_logits,
            "pseudo_bag_mask": nonempty,
            "pseudo_bags": groups,
            "instance_probs": probs,
        }
        return embedding, attention, aux

    def auxiliary_losses(self, aux: Mapping[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        """The unweighted tier-1 loss.

        Parameters
        ----------
        aux : mapping of str to Tensor
            ``forward_aux(...).aux`` of this pooling.
        labels : Tensor
            ``(B,)`` int64 bag labels, ``-1`` = unlabelled (left out).

        Returns
        -------
        dict of str to Tensor
            ``{"tier1": loss}``: float32 scalar, the mean cross-entropy of the tier-1 logits of
            every non-empty pseudo-bag of a labelled bag against the bag's label (0, with the
            graph kept, when no bag is labelled).

        Examples
        --------
        >>> pool = DTFDPooling(4, num_pseudo_bags=2).eval()
        >>> out = pool.forward_aux(torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool))
        >>> pool.auxiliary_losses(out.aux, torch.tensor([-1, -1]))["tier1"]
        tensor(0., grad_fn=...)
        """
        tier1 = labelled_cross_entropy(aux["tier1_logits"], labels, aux["pseudo_bag_mask"])
        return {"tier1": tier1}

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_classes={self.num_classes}, "
            f"num_pseudo_bags={self.num_pseudo_bags}, distill={self.distill!r}, hidden={self.hidden}"
        )
