"""CLAM: clustering-constrained attention MIL, single-branch (``clam_sb``) and multi-branch (``clam_mb``).

Reference
---------
Ming Y. Lu, Drew F. K. Williamson, Tiffany Y. Chen, Richard J. Chen, Matteo Barbieri and
Faisal Mahmood (2021). "Data-efficient and weakly supervised computational pathology on
whole-slide images". *Nature Biomedical Engineering* 5, 555-570.

The method, as implemented here (written from the paper):

1. each real instance ``x_i`` is embedded, ``h_i = dropout(relu(W_1 x_i))`` (width ``H_1``);
2. gated attention (Ilse et al., 2018) gives one score per branch,
   ``a_ik = w_k^T (tanh(V h_i) * sigmoid(U h_i))``; ``clam_sb`` has one branch, ``clam_mb`` one
   branch per class; a float32 softmax over the bag's real instances turns the scores into
   weights;
3. the bag embedding is the attention-weighted sum of the ``h_i`` (``clam_sb``: ``(B, H_1)``;
   ``clam_mb``: one per class, concatenated, ``(B, C * H_1)``);
4. the *instance-level clustering* loss: for each class ``c`` an instance classifier (two
   outputs) is trained on pseudo-labels taken from the attention of the branch of ``c`` (the
   one branch for ``clam_sb``): for the bag's own class ("in-class"), its ``k`` most attended
   real instances are positives and its ``k`` least attended real instances negatives; with
   ``subtyping=True`` (mutually exclusive classes such as tumour subtypes), for every other class
   ("out-of-class") its ``k`` most attended instances are negatives.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milcell._validation import check_choice, check_int, check_real, constraint_error
from milcell.nn.pooling import (
    HiddenSizes,
    MILPooling,
    _check_dropout,
    _check_hidden,
    _no_autocast,
    register_pooling,
)

__all__ = ["CLAMMultiBranch", "CLAMPooling", "CLAMSingleBranch", "branch_softmax", "smooth_top1_svm"]


def branch_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Masked float32 softmax over the instance axis of several attention branches.

    Parameters
    ----------
    scores : Tensor
        ``(B, K, N)`` scores, one row per branch; values at masked positions are ignored.
    mask : Tensor
        ``(B, N)`` bool, ``True`` = real instance, at least one per bag.

    Returns
    -------
    Tensor
        ``(B, K, N)`` float32 weights, exactly 0 at masked positions, each row summing to 1.

    Examples
    --------
    >>> import torch
    >>> w = branch_softmax(torch.zeros(1, 2, 3), torch.tensor([[True, True, False]]))
    >>> w.tolist()
    [[[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]]]
    """
    m = mask.unsqueeze(1)
    with _no_autocast(scores.device):
        s = torch.where(m, scores.float(), float("-inf"))
        return torch.where(m, torch.softmax(s, dim=-1), 0.0)


def smooth_top1_svm(logits: Tensor, target: Tensor, alpha: float = 1.0, tau: float = 1.0) -> Tensor:
    """Smooth top-1 multi-class SVM loss (Berrada, Zisserman & Kumar, ICLR 2018), per sample.

    ``tau * logsumexp_j((alpha * [j != y] + s_j) / tau) - s_y``: a smooth upper bound of the hinge
    loss ``max_j(alpha * [j != y] + s_j) - s_y``, to which it tends as ``tau -> 0``. CLAM offers it
    as an alternative instance loss.

    Parameters
    ----------
    logits : Tensor
        ``(..., C)`` scores.
    target : Tensor
        ``(...)`` int64 classes.
    alpha : float, default 1.0
        Margin.
    tau : float, default 1.0
        Temperature (smoothing).

    Returns
    -------
    Tensor
        ``(...)`` float32 losses.

    Examples
    --------
    >>> import torch
    >>> loss = smooth_top1_svm(torch.tensor([[5.0, -5.0]]), torch.tensor([0]), tau=0.01)
    >>> round(loss.item(), 4)  # the margin is met: hinge loss 0
    0.0
    """
    s = logits.float()
    classes = torch.arange(s.shape[-1], device=s.device)
    margin = alpha * (target.unsqueeze(-1) != classes).float()
    return tau * torch.logsumexp((margin + s) / tau, dim=-1) - s.gather(-1, target.unsqueeze(-1)).squeeze(-1)


class CLAMPooling(MILPooling):
    """CLAM (Lu et al., 2021, *Nature Biomedical Engineering*): gated attention and instance clustering.

    Use it as ``clam_sb`` (:class:`CLAMSingleBranch`) or ``clam_mb``
    (:class:`CLAMMultiBranch`); see the module docstring for the method.

    It is embedding-level: the paper's bag classifier (``clam_sb``: a linear layer on the
    embedding; ``clam_mb``: one linear layer per class on that class's embedding, a
    block-diagonal special case of a linear layer on the concatenation) is the fusion head of
    :class:`~milcell.nn.MILModel`, so clinical fusion heads work on top of it. It is invariant
    to the order of the instances, and exactly so to padding and to the other bags of the batch.

    **Instance loss** (``auxiliary_losses(...)["instance"]``), computed in float32:

    * top-``k`` / bottom-``k`` selection runs on the raw attention scores of the real instances
      only: masked instances are never selected, whatever they hold;
    * a bag with ``n < 2k`` real instances uses ``k_in = floor(n / 2)`` instances on each side
      for its in-class term (so no instance is both a positive and a negative; a bag of one
      instance has no in-class term) and ``k_out = min(k, n)`` for its out-of-class terms;
    * each (bag, class) term is the mean loss over its selected instances; a bag's loss is the
      mean of its terms (with every term present this is the paper's sum over classes divided
      by ``C`` when subtyping); the batch loss is the mean over the labelled bags that have at
      least one term (0, with the graph kept, when there is none);
    * cross-entropy by default (``instance_loss="ce"``, as in the paper's public default
      configuration), or the smooth top-1 SVM (``"svm"``, :func:`smooth_top1_svm`) that the
      paper also reports.

    The paper trains with ``0.7 * L_bag + 0.3 * L_instance``. :meth:`milcell.nn.MILModel.loss`
    computes ``L_bag + instance_loss_weight * L_instance``; the default
    ``instance_loss_weight=0.3`` keeps the paper's instance weight, and ``3 / 7`` (about 0.43)
    would give the paper's ratio of the two terms exactly.

    Parameters
    ----------
    in_dim : int
        Feature size ``D`` of the instances.
    num_classes : int, default 2
        Number of classes ``C >= 2`` (one instance classifier per class; ``clam_mb`` also has one
        attention branch per class).
    hidden : int or tuple of two int, default (512, 256)
        ``(H_1, H_2)``: width of the instance embedding ``h`` and of the gated attention's hidden
        layer (the paper's "small" configuration). One integer ``H`` means ``(H, H // 2)``, at
        least 1.
    dropout : float, default 0.25
        Dropout after the embedding's ReLU and on the gated attention's two activations
        (training only), as in the paper.
    k : int, default 8
        Instances sampled on each side for the instance loss (the paper's ``k_sample``).
    subtyping : bool, default False
        Add the out-of-class terms (classes that exclude each other).
    instance_loss : {"ce", "svm"}, default "ce"
        Loss of the instance classifiers: cross-entropy or the smooth top-1 SVM.
    instance_loss_weight : float, default 0.3
        Weight of the instance loss in :meth:`milcell.nn.MILModel.loss`
        (``aux_loss_weights == {"instance": instance_loss_weight}``; 0 switches it off at no cost).
    """

    multi_branch: bool = False

    def __init__(
        self,
        in_dim: int,
        num_classes: int = 2,
        hidden: HiddenSizes = (512, 256),
        dropout: float = 0.25,
        k: int = 8,
        subtyping: bool = False,
        instance_loss: str = "ce",
        instance_loss_weight: float = 0.3,
    ) -> None:
        super().__init__(in_dim)
        self.num_classes = check_int(num_classes, "num_classes", low=2)
        if isinstance(hidden, int) and not isinstance(hidden, bool):
            width = check_int(hidden, "hidden", low=1)
            hidden = (width, max(1, width // 2))
        self.hidden = _check_hidden(hidden, length=2)
        self.dropout_p = _check_dropout(dropout)
        self.k = check_int(k, "k", low=1)
        if not isinstance(subtyping, bool):
            raise constraint_error("subtyping", "a bool", subtyping)
        self.subtyping = subtyping
        self.instance_loss = check_choice(instance_loss, "instance_loss", ("ce", "svm"))
        weight = check_real(instance_loss_weight, "instance_loss_weight", low=0.0)
        self.aux_loss_weights = {"instance": weight}
        h1, h2 = self.hidden
        self.branches = self.num_classes if self.multi_branch else 1
        self.out_dim = h1 * self.branches
        self.embed = nn.Sequential(nn.Linear(self.in_dim, h1), nn.ReLU(), nn.Dropout(self.dropout_p))
        self.attention_v = nn.Linear(h1, h2)
        self.attention_u = nn.Linear(h1, h2)
        self.attention_w = nn.Linear(h2, self.branches)
        self.attention_dropout = nn.Dropout(self.dropout_p)
        # one 2-way classifier per class, stored as one (2 C, H_1) linear layer
        self.instance_classifiers = nn.Linear(h1, 2 * self.num_classes)

    def _pool_aux(
        self, x: Tensor, mask: Tensor, clinical: Tensor | None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        h = self.embed(x)
        h = torch.where(mask.unsqueeze(-1), h, zero.to(h.dtype))  # (B, N, H_1)
        a = self.attention_dropout(torch.tanh(self.attention_v(h)))
        g = self.attention_dropout(torch.sigmoid(self.attention_u(h)))
        scores = self.attention_w(a * g).transpose(1, 2).float()  # (B, K, N)
        scores = torch.where(mask.unsqueeze(1), scores, 0.0)
        weights = branch_softmax(scores, mask)  # (B, K, N)
        embedding = torch.bmm(weights.to(h.dtype), h).flatten(1)  # (B, K * H_1)
        aux = {"features": h, "attention_scores": scores, "mask": mask}
        if self.multi_branch:
            aux["class_attention"] = weights
        return embedding, weights.mean(dim=1), aux

    def instance_logits(self, features: Tensor) -> Tensor:
        """Logits of the per-class instance classifiers.

        Parameters
        ----------
        features : Tensor
            ``(..., H_1)`` instance embeddings (``aux["features"]`` of :meth:`forward_aux`).

        Returns
        -------
        Tensor
            ``(..., C, 2)``: for each class ``c``, the logits of "not ``c``" and "``c``".

        Examples
        --------
        >>> import torch
        >>> from milcell.nn.pooling import create_pooling
        >>> pool = create_pooling("clam_sb", 4, num_classes=3, hidden=(8, 4))
        >>> out = pool.forward_aux(torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.bool))
        >>> pool.instance_logits(out.aux["features"]).shape
        torch.Size([2, 5, 3, 2])
        """
        logits = self.instance_classifiers(features)
        return logits.unflatten(-1, (self.num_classes, 2))

    def auxiliary_losses(self, aux: Mapping[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        """The instance-level clustering loss, unweighted: ``{"instance": loss}``.

        Parameters
        ----------
        aux : mapping of str to Tensor
            ``aux`` of :meth:`forward_aux`: ``"features"`` ``(B, N, H_1)``,
            ``"attention_scores"`` ``(B, K, N)`` and ``"mask"`` ``(B, N)``.
        labels : Tensor
            ``(B,)`` int64 bag labels in ``[0, C)``, ``-1`` = unlabelled (ignored).

        Returns
        -------
        dict of str to Tensor
            ``{"instance": scalar float32 loss}`` (see the class docstring for the exact rule).

        Examples
        --------
        >>> import torch
        >>> from milcell.nn.pooling import create_pooling
        >>> pool = create_pooling("clam_mb", 4, hidden=(8, 4), k=2, subtyping=True)
        >>> out = pool.forward_aux(torch.randn(2, 6, 4), torch.ones(2, 6, dtype=torch.bool))
        >>> loss = pool.auxiliary_losses(out.aux, torch.tensor([1, -1]))["instance"]
        >>> loss.shape, loss.dtype, bool(loss > 0)
        (torch.Size([]), torch.float32, True)
        """
        h, scores, mask = aux["features"], aux["attention_scores"], aux["mask"]
        batch, n_max, width = h.shape
        c = self.num_classes
        scores = scores.expand(batch, c, n_max)  # the one branch serves every class in clam_sb
        n = mask.sum(dim=1, keepdim=True)  # (B, 1)
        k_in = torch.clamp(n // 2, max=self.k)
        k_out = torch.clamp(n, max=self.k)
        sel = min(self.k, n_max)  # known on the host from the shape
        m = mask.unsqueeze(1)
        with _no_autocast(h.device):
            s = scores.float()
            top = torch.topk(torch.where(m, s, float("-inf")), sel, dim=-1).indices  # (B, C, sel)
            bottom = torch.topk(torch.where(m, s, float("inf")), sel, dim=-1, largest=False).indices
            idx = torch.cat([top, bottom], dim=-1)  # (B, C, 2 sel)
            picked = h.unsqueeze(1).expand(batch, c, n_max, width)
            picked = picked.gather(2, idx.unsqueeze(-1).expand(batch, c, 2 * sel, width))
            logits = self.instance_logits(picked.float())  # (B, C, 2 sel, C, 2)
            own = torch.arange(c, device=h.device).view(1, c, 1, 1, 1).expand(batch, c, 2 * sel, 1, 2)
            logits = logits.gather(3, own).squeeze(3)  # each branch's own classifier: (B, C, 2 sel, 2)

            labelled = labels >= 0
            is_class = labels.unsqueeze(1) == torch.arange(c, device=labels.device)  # (B, C); -1 matches none
            out_class = labelled.unsqueeze(1) & ~is_class & self.subtyping
            rank = torch.arange(sel, device=h.device).view(1, 1, sel)
            top_valid = (is_class.unsqueeze(-1) & (rank < k_in.unsqueeze(-1))) | (
                out_class.unsqueeze(-1) & (rank < k_out.unsqueeze(-1))
            )
            bottom_valid = is_class.unsqueeze(-1) & (rank < k_in.unsqueeze(-1))
            valid = torch.cat([top_valid, bottom_valid], dim=-1)  # (B, C, 2 sel)
            target = torch.cat(
                [is_class.long().unsqueeze(-1).expand(batch, c, sel), torch.zeros_like(bottom)], dim=-1
            )
            if self.instance_loss == "ce":
                per = F.cross_entropy(logits.flatten(0, 2), target.flatten(), reduction="none")
            else:
                per = smooth_top1_svm(logits.flatten(0, 2), target.flatten())
            per = torch.where(valid, per.view(batch, c, 2 * sel), 0.0)
            count = valid.sum(dim=-1)  # (B, C)
            term = per.sum(dim=-1) / count.clamp_min(1)
            present = count > 0
            terms = present.sum(dim=1)  # (B,)
            per_bag = torch.where(present, term, 0.0).sum(dim=1) / terms.clamp_min(1)
            has = terms > 0
            loss = torch.where(has, per_bag, 0.0).sum() / has.sum().clamp_min(1)
        return {"instance": loss}

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_classes={self.num_classes}, hidden={self.hidden}, k={self.k}, "
            f"subtyping={self.subtyping}, instance_loss={self.instance_loss!r}"
        )


@register_pooling("clam_sb")
class CLAMSingleBranch(CLAMPooling):
    """``clam_sb``: CLAM with one attention branch (Lu et al., 2021).

    See :class:`CLAMPooling` for the parameters and the instance loss. ``out_dim == H_1``;
    the weights are the one branch's softmax.

    Examples
    --------
    >>> import torch
    >>> from milcell.nn.pooling import create_pooling
    >>> pool = create_pooling("clam_sb", 6, hidden=(16, 8), k=2).eval()
    >>> mask = torch.tensor([[True, True, True, False], [True] * 4])
    >>> out = pool.forward_aux(torch.randn(2, 4, 6), mask)
    >>> out.embedding.shape, out.attention[0, 3].item(), pool.aux_loss_weights
    (torch.Size([2, 16]), 0.0, {'instance': 0.3})
    >>> pool.auxiliary_losses(out.aux, torch.tensor([0, 1]))["instance"].requires_grad
    True
    """

    multi_branch = False


@register_pooling("clam_mb")
class CLAMMultiBranch(CLAMPooling):
    """``clam_mb``: CLAM with one attention branch per class (Lu et al., 2021).

    See :class:`CLAMPooling` for the parameters and the instance loss. The embedding is the
    concatenation of the ``C`` per-class embeddings (``out_dim == C * H_1``); ``aux`` holds the
    per-class weights ``"class_attention"`` ``(B, C, N)`` and the returned ``(B, N)`` weights
    are their mean over classes.

    Examples
    --------
    >>> import torch
    >>> from milcell.nn.pooling import create_pooling
    >>> pool = create_pooling("clam_mb", 6, num_classes=3, hidden=(16, 8)).eval()
    >>> out = pool.forward_aux(torch.randn(2, 4, 6), torch.ones(2, 4, dtype=torch.bool))
    >>> out.embedding.shape, out.aux["class_attention"].shape, pool.out_dim
    (torch.Size([2, 48]), torch.Size([2, 3, 4]), 48)
    """

    multi_branch = True
