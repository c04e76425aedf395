"""Fusion heads: from a bag embedding and clinical attributes to class logits.

Every head is a :class:`FusionHead` called as ``head(image, clinical)`` with
``image`` the bag embedding ``(B, in_dim)`` (from a pooling) and
``clinical`` the bag's clinical attributes ``(B, clinical_dim)``; either may
be ``None`` when the head does not use it. It returns a :class:`FusionOutput`
``(logits (B, C), experts, gate)``.

====================  =====================================================
name                  head
====================  =====================================================
``linear``            image only: an MLP on the bag embedding
``concat``            MLP on ``[image, clinical]``
``moe``               an image expert and a clinical expert, fused by a
                      small combiner MLP on their class scores
``gated``             ``p * image expert + (1 - p) * clinical expert``
                      (probabilities), ``p`` from a gating network
====================  =====================================================

**One-logit binary heads.** For two classes every head takes
``one_logit=True``: its last layer (and each expert's) outputs a single logit
``z`` and the head returns ``logits = [0, z]`` ``(B, 2)``. Then
``softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)]`` exactly, and cross-entropy
on ``[0, z]`` equals binary cross-entropy with logits on ``z``, so metrics,
ensembles, calibration and saved runs take these logits unchanged;
:meth:`~milcell.nn.model.MILModel.loss` computes the binary cross-entropy on
``z`` (with an optional ``pos_weight``).

``concat``, ``moe`` and ``gated`` take ``use_image`` and ``use_clinical``
flags, so the image-only and clinical-only ablations are the same class with
one input switched off (``clinical_dim=0`` also means image-only). The
"per-instance concatenation" fusion (clinical attributes appended to every
instance before an instance classifier) is a pooling, not a head: use
:class:`milcell.nn.pooling.InstanceMeanPooling` with ``clinical_dim > 0``.

Examples
--------
>>> import torch
>>> from milcell.nn.fusion import create_fusion, list_fusions
>>> list_fusions()
['concat', 'gated', 'linear', 'moe']
>>> head = create_fusion("moe", in_dim=8, clinical_dim=3, num_classes=2, detach_experts=True)
>>> out = head(torch.randn(4, 8), torch.rand(4, 3))
>>> out.logits.shape, sorted(out.experts), out.gate
(torch.Size([4, 2]), ['clinical', 'image'], None)
>>> clinical_only = create_fusion("moe", 8, 3, 2, use_image=False)
>>> clinical_only(None, torch.rand(4, 3)).logits.shape
torch.Size([4, 2])
>>> binary = create_fusion("linear", 8, 0, 2, one_logit=True)
>>> binary.net[-1].out_features, binary(torch.randn(4, 8), None).logits[:, 0].tolist()
(1, [0.0, 0.0, 0.0, 0.0])
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from milcell._validation import check_int
from milcell.exceptions import ConfigError, ShapeError
from milcell.nn.pooling import (
    HiddenSizes,
    _check_clinical,
    _check_dropout,
    _check_hidden,
    _mlp,
    _no_autocast,
    _renamed_attribute,
    _renamed_kwargs,
)
from milcell.registry import Registry

__all__ = [
    "ClinicalMLP",
    "ConcatFusion",
    "FusionHead",
    "FusionOutput",
    "GatedFusion",
    "LinearHead",
    "MoEFusion",
    "create_fusion",
    "list_fusions",
    "register_fusion",
    "two_logits",
]

logger = logging.getLogger("milcell")

_FUSIONS: Registry[FusionHead] = Registry("fusion")

F = TypeVar("F", bound=Callable[..., Any])

_TINY = torch.finfo(torch.float32).tiny

# ``image_dim=`` is the old spelling of ``in_dim=`` (see docs/pooling_fusion.rst, "Naming").
_image_dim_kwarg = _renamed_kwargs(image_dim="in_dim")


class FusionOutput(NamedTuple):
    """What a fusion head returns.

    Attributes
    ----------
    logits : Tensor
        ``(B, C)`` class scores for cross-entropy (for ``gated``: the log of
        the mixed probabilities, float32; for a ``one_logit`` head: ``[0, z]``).
    experts : dict of str to Tensor
        ``(B, C)`` logits of each expert by name (``"image"``, ``"clinical"``)
        for heads that have experts, never detached, so a loss can add
        auxiliary terms; empty for ``linear`` and ``concat``.
    gate : Tensor or None
        ``(B, 1)`` gate ``p`` in (0, 1) (weight of the image expert) for
        ``gated`` with both inputs on; ``None`` otherwise.

    Examples
    --------
    >>> out = FusionOutput(torch.zeros(2, 2), {}, None)
    >>> out.logits.shape, out.gate
    (torch.Size([2, 2]), None)
    """

    logits: Tensor
    experts: dict[str, Tensor]
    gate: Tensor | None


def register_fusion(name: str) -> Callable[[F], F]:
    """Decorator registering a fusion head class (or factory) under ``name``.

    The factory is called as ``factory(in_dim, clinical_dim, num_classes, **kwargs)``.

    Examples
    --------
    >>> "concat" in list_fusions()
    True
    """
    return _FUSIONS.register(name)


@_image_dim_kwarg
def create_fusion(name: str, in_dim: int, clinical_dim: int, num_classes: int, **kwargs: Any) -> FusionHead:
    """Build the fusion head registered under ``name``.

    Parameters
    ----------
    name : str
        One of :func:`list_fusions`.
    in_dim : int
        Size ``D`` of the bag embedding ``(B, D)`` (the pooling's ``out_dim``);
        ``image_dim=``, its old spelling, is still accepted (deprecated).
    clinical_dim : int
        Number ``F`` of clinical attributes ``(B, F)``; ``0`` = none.
    num_classes : int
        Number of classes ``C``.
    **kwargs
        Options of that head (see its class).

    Returns
    -------
    FusionHead

    Raises
    ------
    ConfigError
        For an unknown name, an option the head does not take, or an invalid
        value (the message names the argument). Numpy integer and real
        scalars are accepted and stored as plain ``int`` / ``float``.

    Examples
    --------
    >>> import numpy as np
    >>> create_fusion("concat", np.int64(8), np.int64(3), np.int32(2)).clinical_dim
    3
    >>> head = create_fusion("linear", 512, 0, 2, hidden=(512,))
    >>> head(torch.randn(3, 512), None).logits.shape
    torch.Size([3, 2])
    >>> create_fusion("linear", 512, 0, 2, detach_experts=True)
    Traceback (most recent call last):
    ...
    milcell.exceptions.ConfigError: fusion 'linear' does not take ... 'detach_experts'...
    """
    factory = _FUSIONS.get(name)
    try:
        inspect.signature(factory).bind(in_dim, clinical_dim, num_classes, **kwargs)
    except TypeError as err:
        raise ConfigError(f"fusion {name!r} does not take these arguments: {err}") from None
    return factory(in_dim, clinical_dim, num_classes, **kwargs)


def list_fusions() -> list[str]:
    """Sorted names of the registered fusion heads.

    Examples
    --------
    >>> list_fusions()
    ['concat', 'gated', 'linear', 'moe']
    """
    return _FUSIONS.names()


def two_logits(z: Tensor) -> Tensor:
    """``(B, 1)`` one-logit scores ``z`` → ``(B, 2)`` logits ``[0, z]`` (``softmax`` gives ``sigmoid(z)``).

    A ``(B, 2)`` input is returned as it is.

    Examples
    --------
    >>> z = torch.tensor([[-1.0], [2.0]])
    >>> two_logits(z).tolist()
    [[0.0, -1.0], [0.0, 2.0]]
    >>> torch.allclose(two_logits(z).softmax(dim=1)[:, 1], torch.sigmoid(z[:, 0]))
    True
    """
    if z.ndim != 2 or z.shape[1] not in (1, 2):
        raise ShapeError(f"two_logits: z must have shape (B, 1), got {tuple(z.shape)}")
    if z.shape[1] == 2:
        return z
    return torch.cat([torch.zeros_like(z), z], dim=1)


def _param_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class ClinicalMLP(nn.Module):
    """MLP classifier on clinical attributes; defaults give 3 → 10 → 2 of the 2024 report.

    Parameters
    ----------
    in_dim : int
        Number ``F`` of clinical attributes.
    num_classes : int, default 2
        Number of classes ``C``.
    hidden : int or tuple of int, default (10,)
        Hidden sizes (ReLU between layers).
    dropout : float, default 0.0
        Dropout after each hidden ReLU.

    Examples
    --------
    >>> mlp = ClinicalMLP(3)
    >>> mlp
    ClinicalMLP(
      (net): Sequential(
        (0): Linear(in_features=3, out_features=10, bias=True)
        (1): ReLU()
        (2): Linear(in_features=10, out_features=2, bias=True)
      )
    )
    >>> mlp(torch.rand(5, 3)).shape
    torch.Size([5, 2])
    """

    def __init__(self, in_dim: int, num_classes: int = 2, hidden: HiddenSizes = (10,), dropout: float = 0.0):
        super().__init__()
        self.in_dim = check_int(in_dim, "in_dim", low=1)
        self.num_classes = check_int(num_classes, "num_classes", low=1)
        self.net = _mlp(self.in_dim, _check_hidden(hidden), self.num_classes, _check_dropout(dropout))

    def forward(self, clinical: Tensor) -> Tensor:
        """Class logits ``(B, C)`` of clinical attributes ``(B, F)``.

        Raises
        ------
        ShapeError
            If ``clinical`` is not ``(B, F)`` floating point.
        DataError
            If it holds NaN or inf (the message names the bag); only while
            the value checks are on (:func:`milcell.checks`).
        """
        batch = clinical.shape[0] if isinstance(clinical, Tensor) and clinical.dim() >= 1 else -1
        clinical = _check_clinical(clinical, batch, self.in_dim, "ClinicalMLP")
        return self.net(clinical.to(_param_dtype(self)))


class FusionHead(nn.Module):
    """Base class of the fusion heads: input flags and validation.

    Parameters
    ----------
    in_dim : int
        Size ``D`` of the bag embedding, the image input (the pooling's
        ``out_dim``); ``0`` = no image input. ``image_dim=``, its old
        spelling, is still accepted (deprecated).
    clinical_dim : int
        Number ``F`` of clinical attributes; ``0`` = no clinical input.
    num_classes : int
        Number of classes ``C``.
    use_image : bool, default True
        Use the image input (switched off automatically if ``in_dim == 0``).
    use_clinical : bool, default True
        Use the clinical input (switched off automatically if ``clinical_dim == 0``).
    one_logit : bool, default False
        Binary problems (``num_classes == 2``) only: the last layer outputs
        one logit ``z`` and the head returns ``[0, z]`` (see the module
        docstring).

    Attributes
    ----------
    in_dim, clinical_dim, num_classes : int
        As given (``image_dim``, the old name of ``in_dim``, still reads it
        with a :class:`DeprecationWarning`).
    use_image, use_clinical : bool
        The inputs this head really reads; a model passes ``clinical`` only
        when ``use_clinical`` is True, and a switched-off input may be ``None``.
    one_logit : bool
        As given.
    out_features : int
        Width of the last layer (and of each expert's): 1 with ``one_logit``,
        else ``num_classes``.

    Examples
    --------
    >>> head = ConcatFusion(8, 0, 2)
    >>> head.use_image, head.use_clinical
    (True, False)
    """

    image_dim = _renamed_attribute("image_dim", "in_dim")

    @_image_dim_kwarg
    def __init__(
        self,
        in_dim: int,
        clinical_dim: int,
        num_classes: int,
        use_image: bool = True,
        use_clinical: bool = True,
        one_logit: bool = False,
    ) -> None:
        super().__init__()
        self.in_dim = check_int(in_dim, "in_dim", low=0)
        self.clinical_dim = check_int(clinical_dim, "clinical_dim", low=0)
        self.num_classes = check_int(num_classes, "num_classes", low=2)
        if not isinstance(one_logit, (bool, np.bool_)):
            raise ConfigError(f"one_logit must be a bool, got {one_logit!r}")
        self.one_logit = bool(one_logit)
        if self.one_logit and self.num_classes != 2:
            raise ConfigError(
                f"one_logit=True is for binary problems (num_classes=2), got num_classes={self.num_classes}"
            )
        self.out_features = 1 if self.one_logit else self.num_classes
        self.use_image = bool(use_image) and self.in_dim > 0
        self.use_clinical = bool(use_clinical) and self.clinical_dim > 0
        if not (self.use_image or self.use_clinical):
            raise ConfigError(
                f"{type(self).__name__} has no input: use_image={use_image}, use_clinical={use_clinical}, "
                f"in_dim={in_dim}, clinical_dim={clinical_dim}"
            )

    def _inputs(self, image: Tensor | None, clinical: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """Validate the used inputs; return them (``None`` for switched-off ones)."""
        name = type(self).__name__
        batch = None
        if self.use_image:
            if image is None:
                raise ShapeError(
                    f"image is required by {name} (pass use_image=False for a clinical-only head)"
                )
            if not isinstance(image, Tensor):
                raise ShapeError(f"image must be a torch.Tensor of shape (B, {self.in_dim})")
            if image.dim() != 2 or image.shape[1] != self.in_dim:
                raise ShapeError(
                    f"image must have shape (B, {self.in_dim}) for {name}, got {tuple(image.shape)}"
                )
            if not image.is_floating_point():
                raise ShapeError(f"image must be a floating-point tensor, got dtype {image.dtype}")
            batch = image.shape[0]
        else:
            image = None
        if self.use_clinical:
            if (
                clinical is not None
                and batch is None
                and isinstance(clinical, Tensor)
                and clinical.dim() >= 1
            ):
                batch = clinical.shape[0]
            hint = " (pass use_clinical=False for an image-only head)"
            if clinical is None:
                raise ShapeError(f"clinical is required by {name}{hint}")
            clinical = _check_clinical(clinical, -1 if batch is None else batch, self.clinical_dim, name)
            if image is not None:
                clinical = clinical.to(device=image.device, dtype=image.dtype)
        else:
            clinical = None
        return image, clinical

    def forward(self, image: Tensor | None, clinical: Tensor | None) -> FusionOutput:
        """Fuse ``image (B, D)`` and ``clinical (B, F)`` into class logits.

        Parameters
        ----------
        image : Tensor or None
            ``(B, in_dim)`` bag embedding; may be ``None`` if ``use_image`` is False.
        clinical : Tensor or None
            ``(B, clinical_dim)``; may be ``None`` if ``use_clinical`` is False
            (and is ignored then).

        Returns
        -------
        FusionOutput
            ``(logits (B, C), experts, gate)``.

        Raises
        ------
        ShapeError
            For a missing required input or wrong shapes (names the argument).
        DataError
            For NaN or inf in ``clinical``, while the value checks are on
            (:func:`milcell.checks`).
        """
        image, clinical = self._inputs(image, clinical)
        out = self._fuse(image, clinical)
        if not self.one_logit:
            return out
        return FusionOutput(
            two_logits(out.logits), {k: two_logits(v) for k, v in out.experts.items()}, out.gate
        )

    def _fuse(self, image: Tensor | None, clinical: Tensor | None) -> FusionOutput:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, clinical_dim={self.clinical_dim}, num_classes={self.num_classes}, "
            f"use_image={self.use_image}, use_clinical={self.use_clinical}"
            + (", one_logit=True" if self.one_logit else "")
        )


@register_fusion("linear")
class LinearHead(FusionHead):
    """Image-only head: an MLP on the bag embedding (clinical attributes are ignored).

    ``hidden=(512,)`` with ``in_dim=512`` gives Linear(512, 512)-ReLU-
    Linear(512, 2) of the 2024 lymphocytosis report.

    Parameters
    ----------
    in_dim : int
        Size ``D`` of the bag embedding.
    clinical_dim : int
        Accepted for a uniform signature; not used.
    num_classes : int
        Number of classes ``C``.
    hidden : int or tuple of int, default ()
        Hidden sizes; ``()`` is a single linear layer.
    dropout : float, default 0.0
        Dropout after each hidden ReLU.
    one_logit : bool, default False
        One output logit ``z``, logits ``[0, z]`` (binary only).

    Examples
    --------
    >>> head = LinearHead(512, 0, 2, hidden=(512,))
    >>> [m.__class__.__name__ for m in head.net]
    ['Linear', 'ReLU', 'Linear']
    >>> head(torch.randn(2, 512), None).logits.shape
    torch.Size([2, 2])
    """

    @_image_dim_kwarg
    def __init__(
        self,
        in_dim: int,
        clinical_dim: int,
        num_classes: int,
        hidden: HiddenSizes = (),
        dropout: float = 0.0,
        one_logit: bool = False,
    ) -> None:
        super().__init__(
            in_dim, clinical_dim, num_classes, use_image=True, use_clinical=False, one_logit=one_logit
        )
        self.net = _mlp(self.in_dim, _check_hidden(hidden), self.out_features, _check_dropout(dropout))

    def _fuse(self, image: Tensor | None, clinical: Tensor | None) -> FusionOutput:
        assert image is not None
        return FusionOutput(self.net(image), {}, None)


@register_fusion("concat")
class ConcatFusion(FusionHead):
    """Early fusion: an MLP on the bag embedding concatenated with the clinical attributes.

    Parameters
    ----------
    in_dim : int
        Size ``D`` of the bag embedding.
    clinical_dim : int
        Number ``F`` of clinical attributes.
    num_classes : int
        Number of classes ``C``.
    hidden : int or tuple of int, default (128,)
        Hidden sizes of the MLP on ``[image, clinical]`` (``D + F`` inputs,
        fewer when an input is switched off).
    dropout : float, default 0.0
        Dropout after each hidden ReLU.
    use_image, use_clinical : bool, default True
        Input switches for the ablations.
    one_logit : bool, default False
        One output logit ``z``, logits ``[0, z]`` (binary only).

    Examples
    --------
    >>> head = ConcatFusion(8, 3, 2, hidden=(16,))
    >>> head(torch.randn(4, 8), torch.rand(4, 3)).logits.shape
    torch.Size([4, 2])
    >>> ConcatFusion(8, 3, 2, use_clinical=False)(torch.randn(4, 8), None).logits.shape
    torch.Size([4, 2])
    """

    @_image_dim_kwarg
    def __init__(
        self,
        in_dim: int,
        clinical_dim: int,
        num_classes: int,
        hidden: HiddenSizes = (128,),
        dropout: float = 0.0,
        use_image: bool = True,
        use_clinical: bool = True,
        one_logit: bool = False,
    ) -> None:
        super().__init__(in_dim, clinical_dim, num_classes, use_image, use_clinical, one_logit)
        width = (self.in_dim if self.use_image else 0) + (self.clinical_dim if self.use_clinical else 0)
        self.net = _mlp(width, _check_hidden(hidden), self.out_features, _check_dropout(dropout))

    def _fuse(self, image: Tensor | None, clinical: Tensor | None) -> FusionOutput:
        if image is None:  # clinical only: follow the module's dtype (clinical may come as float64)
            assert clinical is not None
            inp = clinical.to(_param_dtype(self))
        else:  # clinical, if used, was already cast to the image's dtype and device
            inp = image if clinical is None else torch.cat([image, clinical], dim=1)
        return FusionOutput(self.net(inp), {}, None)


class _ExpertHead(FusionHead):
    """Shared construction of an image expert and a clinical expert."""

    def __init__(
        self,
        in_dim: int,
        clinical_dim: int,
        num_classes: int,
        image_hidden: HiddenSizes,
        clinical_hidden: HiddenSizes,
        dropout: float,
        use_image: bool,
        use_clinical: bool,
        one_logit: bool = False,
    ) -> None:
        super().__init__(in_dim, clinical_dim, num_classes, use_image, use_clinical, one_logit)
        dropout = _check_dropout(dropout)
        self.image_expert = (
            _mlp(self.in_dim, _check_hidden(image_hidden, "image_hidden"), self.out_features, dropout)
            if self.use_image
            else None
        )
        self.clinical_expert = (
            ClinicalMLP(
                self.clinical_dim,
                self.out_features,
                _check_hidden(clinical_hidden, "clinical_hidden"),
                dropout,
            )
            if self.use_clinical
            else None
        )

    def _experts(self, image: Tensor | None, clinical: Tensor | None) -> dict[str, Tensor]:
        experts: dict[str, Tensor] = {}
        if self.image_expert is not None:
            assert image is not None
            experts["image"] = self.image_expert(image)
        if self.clinical_expert is not None:
            assert clinical is not None
            experts["clinical"] = self.clinical_expert.net(clinical.to(_param_dtype(self.clinical_expert)))
        return experts


@register_fusion("moe")
class MoEFusion(_ExpertHead):
    """Mixture of experts with a learned combiner (2024 lymphocytosis report).

    An image expert (MLP on the bag embedding) and a clinical expert
    (:class:`ClinicalMLP`) each give ``C`` class scores; a combiner MLP on
    the concatenated scores (``2C`` inputs, hidden 10 by default) gives the
    logits. With ``detach_experts=True`` the combiner sees detached expert
    scores, so its loss trains only the combiner (as in the report); train the
    experts with auxiliary cross-entropy terms on ``FusionOutput.experts``.
    With one input switched off, the combiner sees that expert's ``C``
    scores only.

    Parameters
    ----------
    in_dim : int
        Size ``D`` of the bag embedding.
    clinical_dim : int
        Number ``F`` of clinical attributes.
    num_classes : int
        Number of classes ``C``.
    image_hidden : int or tuple of int, default ()
        Hidden sizes of the image expert (``(512,)`` = the report's head).
    clinical_hidden : int or tuple of int, default (10,)
        Hidden sizes of the clinical expert.
    combiner_hidden : int or tuple of int, default (10,)
        Hidden sizes of the combiner.
    dropout : float, default 0.0
        Dropout after each hidden ReLU of the experts.
    detach_experts : bool, default False
        Stop the combiner's gradients from reaching the experts.
    use_image, use_clinical : bool, default True
        Input switches for the ablations.
    one_logit : bool, default False
        Binary only: each expert and the combiner output one logit (the
        combiner sees the experts' logits ``z``); logits ``[0, z]``.

    Examples
    --------
    >>> head = MoEFusion(8, 3, 2, detach_experts=True)
    >>> head.combiner[0]
    Linear(in_features=4, out_features=10, bias=True)
    >>> out = head(torch.randn(5, 8), torch.rand(5, 3))
    >>> out.logits.shape, out.experts["image"].shape, out.experts["clinical"].shape
    (torch.Size([5, 2]), torch.Size([5, 2]), torch.Size([5, 2]))
    """

    @_image_dim_kwarg
    def __init__(
        self,
        in_dim: int,
        clinical_dim: int,
        num_classes: int,
        image_hidden: HiddenSizes = (),
        clinical_hidden: HiddenSizes = (10,),
        combiner_hidden: HiddenSizes = (10,),
        dropout: float = 0.0,
        detach_experts: bool = False,
        use_image: bool = True,
        use_clinical: bool = True,
        one_logit: bool = False,
    ) -> None:
        super().__init__(
            in_dim,
            clinical_dim,
            num_classes,
            image_hidden,
            clinical_hidden,
            dropout,
            use_image,
            use_clinical,
            one_logit,
        )
        self.detach_experts = bool(detach_experts)
        n_experts = int(self.use_image) + int(self.use_clinical)
        self.combiner = _mlp(
            n_experts * self.out_features,
            _check_hidden(combiner_hidden, "combiner_hidden"),
            self.out_features,
            0.0,
        )

    def _fuse(self, image: Tensor | None, clinical: Tensor | None) -> FusionOutput:
        experts = self._experts(image, clinical)
        scores = torch.cat(list(experts.values()), dim=1)
        if self.detach_experts:
            scores = scores.detach()
        return FusionOutput(self.combiner(scores.to(_param_dtype(self.combiner))), experts, None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, detach_experts={self.detach_experts}"


@register_fusion("gated")
class GatedFusion(_ExpertHead):
    """Gated mixture of an image expert and a clinical expert (Sahasrabudhe et al., 2021).

    A gating network sees a learned low-dimensional summary of the bag
    embedding (``Linear(D, summary_dim)``) concatenated with the clinical
    attributes and outputs ``p = sigmoid(g)`` in (0, 1). The prediction mixes
    probabilities, ``P = p * softmax(image expert) + (1 - p) * softmax(clinical
    expert)``, and the returned logits are ``log P`` (float32, clamped away
    from ``log 0``), so cross-entropy on them is the mixture's likelihood.
    The gate's last bias starts at 0 (``p = 0.5``). With one input switched
    off there is no gate (``gate`` is ``None``) and the logits are that
    expert's log-probabilities.

    Parameters
    ----------
    in_dim : int
        Size ``D`` of the bag embedding.
    clinical_dim : int
        Number ``F`` of clinical attributes.
    num_classes : int
        Number of classes ``C``.
    image_hidden : int or tuple of int, default ()
        Hidden sizes of the image expert.
    clinical_hidden : int or tuple of int, default (10,)
        Hidden sizes of the clinical expert.
    gate_hidden : int or tuple of int, default (16,)
        Hidden sizes of the gating MLP.
    summary_dim : int, default 8
        Size of the image summary the gate sees.
    dropout : float, default 0.0
        Dropout after each hidden ReLU of the experts.
    detach_experts : bool, default False
        Mix detached expert probabilities, so the mixture's loss trains only
        the gate (and the image summary); train the experts with auxiliary
        cross-entropy terms on ``FusionOutput.experts``. This keeps each
        expert calibrated on its own and the gate a router: trained jointly,
        a confident expert and a gate that also reads the image can co-adapt
        into a classifier whose gate no longer reflects which input is
        informative.
    use_image, use_clinical : bool, default True
        Input switches for the ablations.
    one_logit : bool, default False
        Binary only: each expert outputs one logit (its probability is
        ``sigmoid``), and the head returns ``[0, z]`` with ``z`` the
        log-odds of the mixed probability.

    Examples
    --------
    >>> head = GatedFusion(8, 3, 2)
    >>> out = head(torch.randn(5, 8), torch.rand(5, 3))
    >>> out.logits.shape, out.gate.shape
    (torch.Size([5, 2]), torch.Size([5, 1]))
    >>> torch.allclose(out.logits.exp().sum(dim=1), torch.ones(5))
    True
    """

    @_image_dim_kwarg
    def __init__(
        self,
        in_dim: int,
        clinical_dim: int,
        num_classes: int,
        image_hidden: HiddenSizes = (),
        clinical_hidden: HiddenSizes = (10,),
        gate_hidden: HiddenSizes = (16,),
        summary_dim: int = 8,
        dropout: float = 0.0,
        detach_experts: bool = False,
        use_image: bool = True,
        use_clinical: bool = True,
        one_logit: bool = False,
    ) -> None:
        super().__init__(
            in_dim,
            clinical_dim,
            num_classes,
            image_hidden,
            clinical_hidden,
            dropout,
            use_image,
            use_clinical,
            one_logit,
        )
        self.summary_dim = check_int(summary_dim, "summary_dim", low=1)
        self.detach_experts = bool(detach_experts)
        gate_hidden = _check_hidden(gate_hidden, "gate_hidden")
        if self.use_image and self.use_clinical:
            self.summary: nn.Module | None = nn.Linear(self.in_dim, self.summary_dim)
            self.gate: nn.Sequential | None = _mlp(self.summary_dim + self.clinical_dim, gate_hidden, 1, 0.0)
        else:
            self.summary = None
            self.gate = None

    def _fuse(self, image: Tensor | None, clinical: Tensor | None) -> FusionOutput:
        experts = self._experts(image, clinical)
        if self.one_logit:  # [0, z]: the experts' softmax is their sigmoid
            experts = {k: two_logits(v) for k, v in experts.items()}
        if self.gate is None or self.summary is None:
            (only,) = experts.values()
            if self.one_logit:
                return FusionOutput(only[:, 1:].float(), experts, None)
            return FusionOutput(torch.log_softmax(only.float(), dim=1), experts, None)
        assert image is not None and clinical is not None
        g = self.gate(torch.cat([self.summary(image), clinical], dim=1))
        with _no_autocast(g.device):
            p = torch.sigmoid(g.float())
            e_image, e_clinical = experts["image"].float(), experts["clinical"].float()
            if self.detach_experts:
                e_image, e_clinical = e_image.detach(), e_clinical.detach()
            p_image = torch.softmax(e_image, dim=1)
            p_clinical = torch.softmax(e_clinical, dim=1)
            logits = torch.log((p * p_image + (1 - p) * p_clinical).clamp_min(_TINY))
            if self.one_logit:  # the log-odds z of the mixture; the base class returns [0, z]
                logits = logits[:, 1:] - logits[:, :1]
        return FusionOutput(logits, experts, p)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, summary_dim={self.summary_dim}, detach_experts={self.detach_experts}"
