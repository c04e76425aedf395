"""Class-wise attention: one attention distribution and bag embedding per class (Hehr et al., 2023).

Reference
---------
Matthias Hehr, Ario Sadafi, Christian Matek, Peter Lienemann, Christian Pohlkamp, Torsten
Haferlach, Karsten Spiekermann and Carsten Marr (2023). "Explainable AI identifies diagnostic
cells of genetic AML subtypes". *PLOS Digital Health* 2(3): e0000187.

Examples
--------
>>> import torch
>>> from milcell.nn.pooling import create_pooling
>>> pool = create_pooling("class_attention", 8, num_classes=4)
>>> out = pool.forward_aux(torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool))
>>> out.embedding.shape, out.aux["class_attention"].shape, out.attention.shape
(torch.Size([2, 4]), torch.Size([2, 4, 5]), torch.Size([2, 5]))
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from milcell._validation import check_int
from milcell.nn.aggregators._parts import AttentionScorer, reduction, rowwise_softmax, zero_masked
from milcell.nn.pooling import (
    HiddenSizes,
    MILPooling,
    _check_clinical,
    _check_dropout,
    _check_hidden,
    register_pooling,
)

__all__ = ["ClassAttentionPooling"]


@register_pooling("class_attention")
class ClassAttentionPooling(MILPooling):
    """Class-wise attention MIL as in SCEMILA (Hehr et al., 2023): class ``c`` scored from its own attention.

    Matthias Hehr, Ario Sadafi, Christian Matek, Peter Lienemann, Christian Pohlkamp, Torsten
    Haferlach, Karsten Spiekermann and Carsten Marr (2023), "Explainable AI identifies
    diagnostic cells of genetic AML subtypes", PLOS Digital Health 2(3): e0000187.

    SCEMILA classifies a patient's blood smear (a bag of single-cell features) into genetic AML
    subtypes with one attention distribution per class, so that each class can be explained by
    the cells it attended to. For a bag with ``n`` real instances, after the optional reduction
    ``h_i = ReLU(W x_i + b)`` (``dim``; identity when ``dim=None``):

    1. one attention network (``w_c^T tanh(V h_i)``, gated with ``sigmoid(U h_i)`` when
       ``gated=True``) gives ``C`` scores per instance; class ``c`` has its own float32
       softmax ``a^c`` over the real instances, returned as ``aux["class_attention"]``
       ``(B, C, N)``;
    2. class ``c`` has its own bag embedding ``z_c = sum_i a^c_i h_i``;
    3. and its own linear scorer: ``logit_c = u_c^T z_c + b_c`` (plus ``g_c(clinical)``, a linear
       term of the bag's clinical attributes, when ``clinical_dim > 0``), in float32.

    The reported ``attention`` ``(B, N)`` is the mean of the ``C`` class attentions (it sums to
    1 over each bag).

    **Prediction-level.** The logit of class ``c`` depends on the instances only through
    ``a^c``, which is what makes ``a^c`` the explanation of class ``c``; a fusion head on the
    concatenated class embeddings would mix them and lose that. So ``prediction_level`` is True
    (``out_dim == num_classes``) and :func:`~milcell.nn.model.create_mil_model` builds it without
    a head, passing the task's ``num_classes`` and ``clinical_dim``.

    Deterministic; permutation-invariant, batch-independent and independent of ``N_max``.

    Parameters
    ----------
    in_dim : int
        Feature size ``D`` of the instances.
    num_classes : int, default 2
        Number of classes ``C``; ``out_dim == C``.
    dim : int or None, default None
        Width ``F`` of the instance reduction ``Linear + ReLU``; ``None``: no reduction, ``F = D``.
    hidden : int or tuple of one int, default 128
        Hidden size of the attention network.
    dropout : float, default 0.0
        Dropout on the attention network's hidden activations.
    gated : bool, default False
        Gated attention (Ilse et al., 2018) instead of plain attention.
    clinical_dim : int, default 0
        Number of clinical attributes added through a linear term; ``0``: none, and then
        ``use_clinical`` is False.

    Notes
    -----
    ``forward_aux(x, mask).aux`` holds ``"class_attention"`` ``(B, C, N)`` float32 (0 at masked
    positions, each row summing to 1). There is no auxiliary loss.

    Examples
    --------
    >>> pool = ClassAttentionPooling(4, num_classes=3)
    >>> out = pool.forward_aux(torch.randn(1, 3, 4), torch.tensor([[True, True, False]]))
    >>> out.aux["class_attention"][0, :, 2].tolist(), out.aux["class_attention"].sum(dim=-1)
    ([0.0, 0.0, 0.0], tensor([[1.0000, 1.0000, 1.0000]], grad_fn=...))
    """

    prediction_level = True

    def __init__(
        self,
        in_dim: int,
        num_classes: int = 2,
        dim: int | None = None,
        hidden: HiddenSizes = 128,
        dropout: float = 0.0,
        gated: bool = False,
        clinical_dim: int = 0,
    ) -> None:
        super().__init__(in_dim)
        self.num_classes = check_int(num_classes, "num_classes", low=2)
        self.hidden = _check_hidden(hidden, length=1)[0]
        self.gated = bool(gated)
        self.clinical_dim = check_int(clinical_dim, "clinical_dim", low=0)
        self.use_clinical = self.clinical_dim > 0
        self.out_dim = self.num_classes
        self.reduce, width = reduction(self.in_dim, dim)
        self.attention = AttentionScorer(
            width, self.hidden, self.num_classes, _check_dropout(dropout), self.gated
        )
        bound = 1.0 / math.sqrt(width)  # nn.Linear's initialisation, one scorer per class
        self.class_weight = nn.Parameter(torch.empty(self.num_classes, width).uniform_(-bound, bound))
        self.class_bias = nn.Parameter(torch.empty(self.num_classes).uniform_(-bound, bound))
        self.clinical_linear = nn.Linear(self.clinical_dim, self.num_classes) if self.use_clinical else None

    def _pool_aux(
        self, x: Tensor, mask: Tensor, clinical: Tensor | None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        h = zero_masked(self.reduce(x), mask)  # (B, N, F)
        scores = self.attention(h).transpose(1, 2)  # (B, C, N)
        weights = rowwise_softmax(scores, mask.unsqueeze(1).expand_as(scores))  # (B, C, N) float32
        z = torch.bmm(weights.to(h.dtype), h)  # (B, C, F)
        logits = (z.float() * self.class_weight.float()).sum(dim=-1) + self.class_bias.float()
        if self.clinical_linear is not None:
            c = _check_clinical(clinical, x.shape[0], self.clinical_dim, "this class_attention pooling")
            logits = logits + self.clinical_linear(c.to(device=x.device, dtype=x.dtype)).float()
        return logits, weights.mean(dim=1), {"class_attention": weights}

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_classes={self.num_classes}, hidden={self.hidden}, "
            f"gated={self.gated}, clinical_dim={self.clinical_dim}"
        )
