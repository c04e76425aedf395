"""DSMIL: the dual-stream MIL aggregator (``dsmil``).

Reference
---------
Bin Li, Yin Li and Kevin W. Eliceiri (2021). "Dual-stream multiple instance learning network
for whole slide image classification with self-supervised contrastive learning". *Proceedings of
the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)*, 14318-14328.

The method, as implemented here (written from the paper), for a bag of real instances
``h_1 .. h_n`` (``D``) and ``C`` classes:

1. **instance stream**: a linear instance classifier gives scores ``s_ic = w_c^T h_i + b_c``;
   the *critical instance* of class ``c`` is ``m_c = argmax_i s_ic`` over the real instances,
   and the instance-stream prediction is ``c_m = s_{m_c c}``, the max-instance score;
2. **bag stream**: queries ``q_i = W_q h_i`` and information vectors ``v_i = W_v h_i``; the
   attention of instance ``i`` for class ``c`` is its distance (inner product) to the critical
   instance, ``U_ic = softmax_i(<q_i, q_{m_c}> / sqrt(d_q))`` over the real instances; the
   bag embedding of class ``c`` is ``b_c = sum_i U_ic v_i`` and the bag-stream prediction is
   ``c_b = W_b [b_1, ..., b_C]`` (the paper's 1-D convolution with a kernel as wide as ``D``
   over the ``C`` embeddings, which is exactly a linear layer on their concatenation);
3. **dual-stream output**: ``(c_m + c_b) / 2``;
4. the **max-instance loss** trains the instance classifier on ``c_m``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milcell._validation import check_int, check_real
from milcell.nn.pooling import (
    MILPooling,
    _check_clinical,
    _check_dropout,
    _no_autocast,
    register_pooling,
)

__all__ = ["DSMILPooling", "labelled_cross_entropy"]


def labelled_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean float32 cross-entropy over the labelled bags; ``-1`` marks an unlabelled bag.

    With no labelled bag the result is 0 and still part of the graph (no host-device sync).

    Parameters
    ----------
    logits : Tensor
        ``(B, C)`` class scores.
    labels : Tensor
        ``(B,)`` int64 in ``[0, C)`` or ``-1``.

    Returns
    -------
    Tensor
        Scalar float32 loss.

    Examples
    --------
    >>> import torch
    >>> labelled_cross_entropy(torch.zeros(2, 2), torch.tensor([1, -1]))
    tensor(0.6931)
    >>> labelled_cross_entropy(torch.zeros(2, 2), torch.tensor([-1, -1]))
    tensor(0.)
    """
    labelled = labels >= 0
    with _no_autocast(logits.device):
        per = F.cross_entropy(logits.float(), labels.clamp_min(0), reduction="none")
        return torch.where(labelled, per, 0.0).sum() / labelled.sum().clamp_min(1)


@register_pooling("dsmil")
class DSMILPooling(MILPooling):
    """DSMIL, the dual-stream MIL aggregator (Li, Li & Eliceiri, CVPR 2021).

    See the module docstring for the method. It is **prediction-level**
    (``prediction_level=True``, ``out_dim == num_classes``): its defining output, the mean of
    the max-instance score and the bag score, is a class score that needs the instance
    classifier's per-class scores, so it cannot be an embedding under a separate head. (The
    bag stream's own classifier is inside the pooling; clinical attributes, when
    ``clinical_dim > 0``, are concatenated to its input.) The output is used as logits of a
    softmax cross-entropy; the paper's per-class sigmoid becomes a softmax over the ``C``
    classes, as everywhere in milcell.

    Guarantees: masked instances have no influence; the critical instance is chosen among the
    real instances only, on scores computed in float64 (float32 on MPS) with autocast off, so
    the choice does not depend on the batch or on reduced precision; the output is invariant to
    the order of the instances (two real instances with exactly equal float64 scores but
    different features would be resolved by position; with continuous features this has
    probability zero); softmaxes are float32.

    Cost: the float64 scores are computed only for the 16 best instances of each class by the
    float32 scores; this is the choice of a float64 argmax over all the real instances (the
    earliest position among exactly equal scores) unless 16 or more real instances come within
    float32 rounding of the best one (copies of one instance included: then another copy may be
    named critical, with the same output). The queries of the other instances are never formed:
    ``<q_i, q_m> = h_i . (W_q^T q_m) + b_q . q_m``, one product of the instances with ``C``
    vectors of size ``D`` (computed with the instance scores, in float32 with autocast off).
    Without dropout (``dropout=0`` or eval) the value projection is applied to the ``C``
    attention-pooled instances, ``W_v (sum_i U_ic h_i) + (sum_i U_ic) b_v``, instead of to every
    instance (equal up to float rounding; ``N / C`` times fewer ``D x D`` products).

    ``aux`` (of :meth:`forward_aux`): ``"instance_scores"`` ``(B, N, C)`` (0 at masked
    positions), ``"max_scores"`` ``(B, C)`` (``c_m``), ``"bag_scores"`` ``(B, C)`` (``c_b``),
    ``"class_attention"`` ``(B, C, N)`` (``U``; the returned ``(B, N)`` weights are its mean
    over classes) and ``"critical_instances"`` ``(B, C)`` int64 (index of ``m_c`` in ``N``).

    The paper trains with ``0.5 * L(c_b) + 0.5 * L(c_m)``. In
    :meth:`milcell.nn.MILModel.loss` the bag loss is on the dual-stream output the model
    predicts with, and the auxiliary ``"max_instance"`` loss ``L(c_m)`` (cross-entropy over the
    labelled bags) is added with ``max_instance_loss_weight``.

    Parameters
    ----------
    in_dim : int
        Feature size ``D``.
    num_classes : int, default 2
        Number of classes ``C >= 2``; ``out_dim == C``.
    query_dim : int, default 128
        Size ``d_q`` of the queries.
    dropout : float, default 0.0
        Dropout on the information vectors ``v`` (training only).
    clinical_dim : int, default 0
        Number ``F`` of clinical attributes fed to the bag-stream classifier; 0 = none.
    max_instance_loss_weight : float, default 0.5
        Weight of the max-instance loss (``aux_loss_weights == {"max_instance": ...}``).

    Examples
    --------
    >>> import torch
    >>> from milcell.nn.pooling import create_pooling
    >>> pool = create_pooling("dsmil", 6, num_classes=3, query_dim=8).eval()
    >>> mask = torch.tensor([[True, True, False], [True] * 3])
    >>> out = pool.forward_aux(torch.randn(2, 3, 6), mask)
    >>> out.embedding.shape, pool.prediction_level
    (torch.Size([2, 3]), True)
    >>> sorted(out.aux)
    ['bag_scores', 'class_attention', 'critical_instances', 'instance_scores', 'max_scores']
    >>> torch.allclose(out.embedding, (out.aux["max_scores"] + out.aux["bag_scores"]) / 2)
    True
    >>> out.attention[0].tolist()[2], pool.aux_loss_weights
    (0.0, {'max_instance': 0.5})
    """

    prediction_level = True
    _CANDIDATES = 16  # instances of the float32 ranking rescored in float64

    def __init__(
        self,
        in_dim: int,
        num_classes: int = 2,
        query_dim: int = 128,
        dropout: float = 0.0,
        clinical_dim: int = 0,
        max_instance_loss_weight: float = 0.5,
    ) -> None:
        super().__init__(in_dim)
        self.num_classes = check_int(num_classes, "num_classes", low=2)
        self.query_dim = check_int(query_dim, "query_dim", low=1)
        self.clinical_dim = check_int(clinical_dim, "clinical_dim", low=0)
        self.use_clinical = self.clinical_dim > 0
        weight = check_real(max_instance_loss_weight, "max_instance_loss_weight", low=0.0)
        self.aux_loss_weights = {"max_instance": weight}
        self.out_dim = self.num_classes
        self.instance_classifier = nn.Linear(self.in_dim, self.num_classes)
        self.query = nn.Linear(self.in_dim, self.query_dim)
        self.value = nn.Linear(self.in_dim, self.in_dim)
        self.dropout = nn.Dropout(_check_dropout(dropout))
        self.bag_classifier = nn.Linear(self.num_classes * self.in_dim + self.clinical_dim, self.num_classes)

    def _critical(self, x: Tensor, mask: Tensor) -> Tensor:
        """``(B, C)`` long: the critical instance of each class, chosen on float64 scores (see the class).

        The float64 scores are computed for the ``K = _CANDIDATES`` best instances of the float32
        ranking only (``(B, K, C, D)`` instead of a float64 copy of ``x``); the float64 best is
        among them unless ``K`` real instances come within float32 rounding of it.
        """
        b, _, d = x.shape
        c, k = self.num_classes, self._CANDIDATES
        dtype = torch.float32 if x.device.type == "mps" else torch.float64
        weight, bias = self.instance_classifier.weight, self.instance_classifier.bias
        with _no_autocast(x.device), torch.no_grad():
            rough = F.linear(x.float(), weight.float(), bias.float())
            rough = torch.where(mask.unsqueeze(-1), rough, float("-inf"))
            # -inf padding: top-k works for every bag size, with no Python arithmetic on N (tracing)
            rough = torch.cat([rough, rough.new_full((b, k, c), float("-inf"))], dim=1)
            top, idx = rough.topk(k, dim=1)  # (B, K, C)
            real = top > float("-inf")
            idx = torch.where(real, idx, 0)  # padding -> any valid position, never chosen
            rows = x.gather(1, idx.reshape(b, k * c, 1).expand(b, k * c, d)).view(b, k, c, d)
            exact = (rows.to(dtype) * weight.to(dtype)).sum(-1) + bias.to(dtype)  # (B, K, C)
            exact = torch.where(real, exact, float("-inf"))
            best = real & (exact == exact.amax(dim=1, keepdim=True))
            # among equal float64 scores, the earliest position
            first = torch.where(best, idx, torch.iinfo(torch.long).max).amin(dim=1)  # (B, C)
            return torch.where(best.any(dim=1), first, 0)

    def _pool_aux(
        self, x: Tensor, mask: Tensor, clinical: Tensor | None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        batch = x.shape[0]
        c = self.num_classes
        d = x.shape[-1]
        critical = self._critical(x, mask)  # (B, C), real instances only
        h_crit = x.gather(1, critical.unsqueeze(-1).expand(batch, c, d))  # (B, C, D)
        q_crit = self.query(h_crit)  # (B, C, d_q)
        dt = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for a float64 model
        with _no_autocast(x.device):
            # <q_i, q_m> = h_i . (W_q^T q_m) + b_q . q_m: no query is computed for the other instances;
            # the instance scores and these products come from one product with x (one gradient to x)
            qc = q_crit.to(dt)
            key = qc @ self.query.weight.to(dt)  # (B, C, D)
            weight = self.instance_classifier.weight.to(dt)
            right = torch.cat([weight.T.expand(batch, d, c), key.transpose(1, 2)], dim=2)  # (B, D, 2C)
            scores, dist = torch.bmm(x.to(dt), right).split([c, c], dim=-1)  # (B, N, C) each
            scores = torch.where(mask.unsqueeze(-1), scores + self.instance_classifier.bias.to(dt), 0.0)
            max_scores = scores.gather(1, critical.unsqueeze(1)).squeeze(1)  # (B, C)
            dist = dist.transpose(1, 2) + (qc @ self.query.bias.to(dt)).unsqueeze(-1)  # (B, C, N)
            dist = torch.where(mask.unsqueeze(1), dist / math.sqrt(self.query_dim), float("-inf"))
            attention = torch.where(mask.unsqueeze(1), torch.softmax(dist, dim=-1), 0.0)  # (B, C, N)
        if self.training and self.dropout.p > 0:
            v = self.dropout(self.value(x))
            bag = torch.bmm(attention.to(v.dtype), v)  # (B, C, D)
        else:
            # sum_i U_ic (W_v h_i + b_v) = W_v (sum_i U_ic h_i) + (sum_i U_ic) b_v: the value projection
            # of C pooled vectors instead of N instances
            pooled = torch.bmm(attention.to(x.dtype), x)  # (B, C, D)
            bag = F.linear(pooled, self.value.weight) + attention.sum(-1, keepdim=True) * self.value.bias
        inp = bag.flatten(1)
        if self.use_clinical:
            cl = _check_clinical(clinical, batch, self.clinical_dim, "this dsmil pooling")
            inp = torch.cat([inp, cl.to(device=inp.device, dtype=inp.dtype)], dim=1)
        bag_scores = self.bag_classifier(inp)
        out = (max_scores + bag_scores.to(max_scores.dtype)) / 2
        aux = {
            "instance_scores": scores,
            "max_scores": max_scores,
            "bag_scores": bag_scores,
            "class_attention": attention,
            "critical_instances": critical,
        }
        return out, attention.mean(dim=1), aux

    def auxiliary_losses(self, aux: Mapping[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        """The max-instance loss, unweighted: cross-entropy of ``aux["max_scores"]``.

        Parameters
        ----------
        aux : mapping of str to Tensor
            ``aux`` of :meth:`forward_aux` (needs ``"max_scores"`` ``(B, C)``).
        labels : Tensor
            ``(B,)`` int64 bag labels, ``-1`` = unlabelled (ignored).

        Returns
        -------
        dict of str to Tensor
            ``{"max_instance": scalar float32 loss}``, the mean over the labelled bags (0 with
            the graph kept when there is none).

        Examples
        --------
        >>> import torch
        >>> from milcell.nn.pooling import create_pooling
        >>> pool = create_pooling("dsmil", 4)
        >>> out = pool.forward_aux(torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool))
        >>> pool.auxiliary_losses(out.aux, torch.tensor([0, 1]))["max_instance"].requires_grad
        True
        """
        return {"max_instance": labelled_cross_entropy(aux["max_scores"], labels)}

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_classes={self.num_classes}, query_dim={self.query_dim}, "
            f"clinical_dim={self.clinical_dim}"
        )
