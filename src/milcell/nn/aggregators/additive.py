"""Additive MIL: per-instance class contributions that sum exactly to the bag logits (Javed et al., 2022).

Reference
---------
Syed Ashar Javed, Dinkar Juyal, Harshith Padigela, Amaro Taylor-Weiner, Limin Yu and Aaditya
Prakash (2022). "Additive MIL: Intrinsically Interpretable Multiple Instance Learning for
Pathology". *Advances in Neural Information Processing Systems (NeurIPS)* 35.

Examples
--------
>>> import torch
>>> from milcell.nn.pooling import create_pooling
>>> pool = create_pooling("additive", 8, num_classes=3)
>>> out = pool.forward_aux(torch.randn(2, 4, 8), torch.tensor([[True] * 4, [True, True, False, False]]))
>>> out.embedding.shape, out.aux["contributions"].shape
(torch.Size([2, 3]), torch.Size([2, 4, 3]))
>>> torch.allclose(out.aux["contributions"].sum(dim=1), out.embedding)
True
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from milcell._validation import check_int
from milcell.nn.aggregators._parts import AttentionScorer
from milcell.nn.pooling import (
    HiddenSizes,
    MILPooling,
    _check_clinical,
    _check_dropout,
    _check_hidden,
    _mlp,
    masked_softmax,
    register_pooling,
)

__all__ = ["AdditivePooling"]


@register_pooling("additive")
class AdditivePooling(MILPooling):
    """Additive MIL (Javed et al., 2022): the bag logits are a sum of per-instance class contributions.

    Syed Ashar Javed, Dinkar Juyal, Harshith Padigela, Amaro Taylor-Weiner, Limin Yu and
    Aaditya Prakash (2022), "Additive MIL: Intrinsically Interpretable Multiple Instance
    Learning for Pathology", NeurIPS 2022.

    Attention MIL mixes the instances before classifying the mixture, so the attention weights
    say where the model looked, not what each instance contributed to the decision. Additive
    MIL moves the classifier before the sum. For a bag with ``n`` real instances ``x_i``:

    1. attention weights ``a_i`` = float32 masked softmax of ``w^T tanh(V x_i)`` (gated with
       ``sigmoid(U x_i)`` when ``gated=True``), as in attention MIL;
    2. each instance is scaled by its weight and classified on its own:
       ``c_i = psi(a_i x_i)`` ``(C,)`` with ``psi`` an MLP (``classifier_hidden``), kept in
       float32; ``c_i`` is exactly 0 at masked positions;
    3. the bag logits are ``sum_i c_i`` (plus ``g(clinical)``, a linear term of the bag's
       clinical attributes, when ``clinical_dim > 0``).

    The guarantee: ``logits == aux["contributions"].sum(dim=1) (+ aux["clinical_contribution"])``
    up to float32 rounding, for every bag and every mask, so ``c_i[c]`` is exactly how much
    instance ``i`` adds to (or takes from) the logit of class ``c``. As in the paper, ``psi`` has
    a bias, so an instance with ``a_i -> 0`` still contributes ``psi(0)``: the logits carry an
    intercept proportional to the bag size.

    **Prediction-level.** The output is the class logits ``(B, C)``, not an embedding:
    a fusion head on top would mix the classes again and break the additive decomposition,
    so ``prediction_level`` is True (``out_dim == num_classes``) and
    :func:`~milcell.nn.model.create_mil_model` builds it without a head, passing the task's
    ``num_classes`` and ``clinical_dim``. Clinical attributes enter only through the separate,
    reported linear term, which keeps the decomposition exact.

    Parameters
    ----------
    in_dim : int
        Feature size ``D`` of the instances.
    num_classes : int, default 2
        Number of classes ``C``; ``out_dim == C``.
    hidden : int or tuple of one int, default 128
        Hidden size of the attention network.
    classifier_hidden : int or tuple of int, default ()
        Hidden sizes of the instance classifier ``psi`` (a :data:`~milcell.nn.pooling.HiddenSizes`);
        ``()`` is linear.
    dropout : float, default 0.0
        Dropout on the attention network's and ``psi``'s hidden activations.
    gated : bool, default False
        Gated attention (Ilse et al., 2018) instead of plain attention.
    clinical_dim : int, default 0
        Number ``F`` of clinical attributes added through a linear term; ``0``: none, and then
        ``use_clinical`` is False.

    Notes
    -----
    ``forward_aux(x, mask).aux`` holds ``"contributions"`` ``(B, N, C)`` float32 (0 at masked
    positions) and, when ``clinical_dim > 0``, ``"clinical_contribution"`` ``(B, C)`` float32.
    There is no auxiliary loss.

    Examples
    --------
    >>> pool = AdditivePooling(4, num_classes=2, clinical_dim=2)
    >>> x, mask = torch.randn(1, 3, 4), torch.tensor([[True, True, False]])
    >>> out = pool.forward_aux(x, mask, clinical=torch.randn(1, 2))
    >>> out.aux["contributions"][0, 2].tolist()
    [0.0, 0.0]
    >>> total = out.aux["contributions"].sum(dim=1) + out.aux["clinical_contribution"]
    >>> torch.allclose(total, out.embedding)
    True
    """

    prediction_level = True

    def __init__(
        self,
        in_dim: int,
        num_classes: int = 2,
        hidden: HiddenSizes = 128,
        classifier_hidden: HiddenSizes = (),
        dropout: float = 0.0,
        gated: bool = False,
        clinical_dim: int = 0,
    ) -> None:
        super().__init__(in_dim)
        self.num_classes = check_int(num_classes, "num_classes", low=2)
        self.hidden = _check_hidden(hidden, length=1)[0]
        self.classifier_hidden = _check_hidden(classifier_hidden, "classifier_hidden")
        self.gated = bool(gated)
        self.clinical_dim = check_int(clinical_dim, "clinical_dim", low=0)
        self.use_clinical = self.clinical_dim > 0
        self.out_dim = self.num_classes
        drop = _check_dropout(dropout)
        self.attention = AttentionScorer(self.in_dim, self.hidden, 1, drop, self.gated)
        self.classifier = _mlp(self.in_dim, self.classifier_hidden, self.num_classes, drop)
        self.clinical_linear = nn.Linear(self.clinical_dim, self.num_classes) if self.use_clinical else None

    def _pool_aux(
        self, x: Tensor, mask: Tensor, clinical: Tensor | None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        attention = masked_softmax(self.attention(x).squeeze(-1), mask)  # (B, N) float32
        scaled = attention.unsqueeze(-1).to(x.dtype) * x
        contributions = self.classifier(scaled).float()  # (B, N, C), summed in float32 below
        contributions = torch.where(mask.unsqueeze(-1), contributions, 0.0)
        logits = contributions.sum(dim=1)
        aux = {"contributions": contributions}
        if self.clinical_linear is not None:
            c = _check_clinical(clinical, x.shape[0], self.clinical_dim, "this additive pooling")
            term = self.clinical_linear(c.to(device=x.device, dtype=x.dtype)).float()
            logits = logits + term
            aux["clinical_contribution"] = term
        return logits, attention, aux

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_classes={self.num_classes}, hidden={self.hidden}, "
            f"classifier_hidden={self.classifier_hidden}, gated={self.gated}, "
            f"clinical_dim={self.clinical_dim}"
        )
