"""Export a trained model for inference outside Python training code: ONNX and TorchScript.

:func:`export_run` writes a saved run's patient-level model, and
:func:`export_model` a bare :class:`~milcell.nn.model.MILModel` (or a list of
them), as **one file** that maps **one bag of any size** to class
probabilities and per-instance attention:

=========================  ==================  ================================================
name                       shape               what
=========================  ==================  ================================================
``instances`` (input)      ``(N, C, H, W)``    the bag's cell images, float32, ``H = W`` = the
                           or ``(N, D)``       run's ``image_size``, preprocessed (below); or
                                               the bag's cached features (feature runs)
``clinical`` (input)       ``(F,)``            raw clinical attributes, float32, in the order
                                               of ``clinical_names``; ``NaN`` = missing
                                               (imputed in the graph). Only when the model
                                               reads them.
``probabilities``          ``(C,)``            the soft vote (mean) of the fold models'
                                               probabilities, calibrated when the run is
``attention``              ``(N,)``            per-instance weights, the mean over the fold
                                               models (each sums to 1 over the bag)
``fold_probabilities``     ``(M, C)``          each fold model's (uncalibrated) probabilities
=========================  ==================  ================================================

The bag axis ``N`` is dynamic: the file is traced on one bag size and
checked, before it is written (``verify=True``), to give the model's outputs
on other bag sizes (a bag size used for tracing is never baked in). Inside the
graph: the backbone (or the instance encoder of a feature model), the pooling,
the fusion head, each fold's **clinical scaling** (median imputation of
``NaN``, then ``x * scale + offset``), the soft vote over the fold models (one
graph holds them all) and the run's **calibration** when it has one
(:mod:`milcell.calibration`: the calibrator applied to the log of the voted
probabilities, as :meth:`milcell.runs.SavedRun.predict` does).

What ``instances`` must hold (images): each cell image resized to
``image_size x image_size`` with the recorded ``interpolation`` (antialiased),
as float32 RGB in ``[0, 1]`` (``uint8 / 255``), channels first, then
normalised with the recorded ``mean`` and ``std`` (``(x - mean) / std`` per
channel): what :meth:`milcell.runs.Preprocessing.transform` gives in
evaluation. With ``normalize=True`` the normalisation is inside the graph and
the input stays in ``[0, 1]``. Resizing is never in the graph.

Every exported file records its preprocessing and labels as metadata
(:func:`read_metadata`): ONNX ``metadata_props`` (strings; JSON values), and
TorchScript ``_extra_files`` (``milcell.json``). Keys: ``format``,
``format_version``, ``milcell_version``, ``input`` (``"images"`` or
``"features"``), ``image_size``, ``mean``, ``std``, ``interpolation``,
``normalize``, ``channels``, ``feature_dim``, ``features``, ``class_names``,
``clinical_names``, ``clinical_input``, ``folds``, ``vote``, ``calibration``,
``pooling``, ``backbone``, ``inputs``, ``outputs``.

Formats: ``"onnx"`` uses PyTorch's TorchScript-based ONNX exporter
(``torch.onnx.export(..., dynamo=False)``, opset 17) — the ``torch.export``-based
exporter needs the extra ``onnxscript`` package — and needs the ``export``
extra (``pip install "milcell[export]"``: ``onnx`` and ``onnxruntime``, the
latter for the check); ``"torchscript"`` uses :func:`torch.jit.trace` and
needs nothing more (load it with :func:`torch.jit.load`). PyTorch marks both
the TorchScript-based ONNX exporter and TorchScript itself as deprecated (they
warn, and work, in torch 2.14); the ``torch.export``-based path is the way
forward once they are removed.

Poolings that cannot be exported (:data:`NOT_EXPORTABLE`) raise
:class:`~milcell.exceptions.ExportError` naming the pooling and the reason.

Examples
--------
>>> import torch
>>> from milcell.nn.model import create_mil_model
>>> from milcell.export import BagPredictor, export_model, read_metadata
>>> model = create_mil_model(None, pooling="gated_attention", in_dim=8, clinical_dim=2, fusion="concat")
>>> predictor = BagPredictor([model.eval()])
>>> p, a, folds = predictor(torch.randn(5, 8), torch.tensor([0.3, 1.2]))
>>> p.shape, a.shape, folds.shape, round(float(a.sum()), 4)
(torch.Size([2]), torch.Size([5]), torch.Size([1, 2]), 1.0)
>>> import tempfile, pathlib
>>> path = export_model(model, pathlib.Path(tempfile.mkdtemp()) / "model.pt", format="torchscript")
>>> scripted = torch.jit.load(str(path))
>>> scripted(torch.randn(198, 8), torch.zeros(2))[1].shape
torch.Size([198])
>>> read_metadata(path)["input"], read_metadata(path)["clinical_input"]
('features', True)
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from milcell._checks import checks
from milcell._utils import atomic_path
from milcell._validation import check_choice, check_int
from milcell.exceptions import ExportError

__all__ = [
    "EXPORT_FORMATS",
    "NOT_EXPORTABLE",
    "BagPredictor",
    "export_model",
    "export_run",
    "exportable",
    "read_metadata",
]

logger = logging.getLogger("milcell")

#: The formats :func:`export_run` and :func:`export_model` write.
EXPORT_FORMATS = ("onnx", "torchscript")

#: Poolings that cannot be exported, by name: ``{format: reason}`` (``"*"``: every format).
NOT_EXPORTABLE: dict[str, dict[str, str]] = {
    "transmil": {
        "*": "its PPEG grid side ceil(sqrt(N)) is computed in Python from the bag size, so a traced graph "
        "would keep the side of the tracing bag (shape-dependent control flow)",
    },
    "conv": {
        "*": "its ranking reinterprets float32 features as int32 (a bit cast, Tensor.view(torch.int32)) to "
        "sort them lexicographically, which neither torch.jit.trace nor ONNX can record",
    },
    "dtfd": {
        "*": "its eval-mode pseudo-bags come from a lexicographic ranking that reinterprets float32 features "
        "as int32 (a bit cast, Tensor.view(torch.int32)), which neither torch.jit.trace nor ONNX can record",
    },
}

_FORMAT = "milcell.export"
_FORMAT_VERSION = 1
_OPSET = 17
_TRACE_SIZE = 5  # the bag size traced; checked against other sizes before a file is written
_VERIFY_SIZES = (1, 12)
_TOLERANCE = 1e-4
_LOG_FLOOR = 1e-12  # as milcell.calibration.Calibrator.transform_probabilities
_METADATA_FILE = "milcell.json"


def exportable(pooling: str, format: str = "onnx") -> tuple[bool, str]:
    """Whether a pooling can be exported to ``format``, and if not, why.

    Parameters
    ----------
    pooling : str
        A registered pooling name (:func:`milcell.nn.pooling.list_poolings`).
    format : {"onnx", "torchscript"}, default "onnx"
        The export format.

    Returns
    -------
    (bool, str)
        ``(True, "")``, or ``(False, reason)``.

    Examples
    --------
    >>> exportable("gated_attention")
    (True, '')
    >>> exportable("transmil", "torchscript")[0]
    False
    """
    check_choice(format, "format", EXPORT_FORMATS)
    reasons = NOT_EXPORTABLE.get(pooling, {})
    reason = reasons.get(format) or reasons.get("*")
    return (False, reason) if reason else (True, "")


# --------------------------------------------------------------------------- the exported module


def _pooling_name(model: nn.Module) -> str:
    config = getattr(model, "config", None) or {}
    if config.get("pooling"):
        return str(config["pooling"])
    from milcell.nn.pooling import _POOLINGS

    kind = type(getattr(model, "pooling", None))
    for name in _POOLINGS.names():
        if _POOLINGS.get(name) is kind:
            return name
    return kind.__name__


def _scaler_arrays(scaler: Any, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``fill``, ``scale``, ``offset`` ``(F,)`` of a fitted clinical scaler (identity for None)."""
    if scaler is None:
        return np.full(width, np.nan), np.ones(width), np.zeros(width)
    fill, scale, offset = (
        np.asarray(getattr(scaler, k), dtype=np.float64) for k in ("fill", "scale", "offset")
    )
    if any(a is None or a.shape != (width,) for a in (fill, scale, offset)):
        raise ExportError(f"the clinical scaler must be fitted on {width} attributes, got {scaler!r}")
    return fill, scale, offset


class BagPredictor(nn.Module):
    """One bag → voted class probabilities and attention: the module that is exported.

    It runs every fold model on one bag (no padding, no mask: the bag is all
    real instances), with each fold's clinical scaling, and averages the
    probabilities (soft vote) and the attention; a calibration, when given,
    maps the voted probabilities last. Its forward pass reads no value on the
    host, so :func:`torch.jit.trace` records it with a dynamic bag size.

    Parameters
    ----------
    models : sequence of MILModel
        The fold models (one for a single model), with the same input
        (images or features of the same width) and classes. They are copied,
        in eval mode and float32 on the CPU.
    scalers : sequence of ClinicalScaler or None, optional
        Each model's clinical scaling (:class:`milcell.data.records.ClinicalScaler`,
        or None: the clinical input is used as given). Default: none.
    calibrator : milcell.calibration.Calibrator, optional
        A fitted calibrator applied to ``log(mean_m p_m)``.
    mean, std : sequence of float, optional
        With both given, images are normalised inside: ``(x - mean) / std`` per channel.

    Attributes
    ----------
    clinical_dim : int
        ``F`` of the clinical input; 0 when no model reads clinical attributes
        (then ``forward`` takes the instances only).
    image_input : bool
        Whether the instances are images ``(N, C, H, W)`` (else features ``(N, D)``).

    Examples
    --------
    >>> import torch
    >>> from milcell.nn.model import create_mil_model
    >>> folds = [create_mil_model(None, pooling="attention", in_dim=4, num_classes=3) for _ in range(2)]
    >>> p, a, per_fold = BagPredictor(folds)(torch.randn(7, 4))
    >>> p.shape, a.shape, per_fold.shape, torch.allclose(p, per_fold.mean(0))
    (torch.Size([3]), torch.Size([7]), torch.Size([2, 3]), True)
    """

    clinical_fill: Tensor
    clinical_scale: Tensor
    clinical_offset: Tensor
    calibration_weight: Tensor
    calibration_bias: Tensor
    mean: Tensor
    std: Tensor

    def __init__(
        self,
        models: Sequence[nn.Module],
        scalers: Sequence[Any | None] | None = None,
        calibrator: Any | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        from milcell.nn.encoder import InstanceEncoder
        from milcell.nn.model import MILModel

        given = list(models)
        if not given:
            raise ExportError("BagPredictor: models is empty; give at least one MILModel")
        checked: list[MILModel] = []
        for i, model in enumerate(given):
            if not isinstance(model, MILModel):
                raise ExportError(f"BagPredictor: models[{i}] is a {type(model).__name__}, not a MILModel")
            if not model.use_image:
                raise ExportError(
                    f"BagPredictor: models[{i}] is clinical-only (use_image=False); an exported model "
                    "maps a bag of instances"
                )
            checked.append(model)
        self.num_classes = int(checked[0].num_classes)
        self.clinical_dim = max(int(m.clinical_dim) if m.use_clinical else 0 for m in checked)
        for i, model in enumerate(checked):
            if int(model.num_classes) != self.num_classes:
                raise ExportError(
                    f"BagPredictor: models[{i}] has {model.num_classes} classes, models[0] {self.num_classes}"
                )
            if model.use_clinical and int(model.clinical_dim) != self.clinical_dim:
                raise ExportError("BagPredictor: the models read different numbers of clinical attributes")
        copies = [copy.deepcopy(m).float().cpu().eval() for m in checked]
        # The network each fold runs on the bag: the backbone itself (an InstanceEncoder's chunking is a
        # training-time memory bound; one call sees the whole bag), or None for features pooled as given.
        encoders: list[Any] = [
            m.encoder.backbone if isinstance(m.encoder, InstanceEncoder) else m.encoder for m in copies
        ]
        image = [getattr(e, "in_chans", None) is not None for e in encoders]
        if len(set(image)) > 1:
            raise ExportError("BagPredictor: some models take images and others features")
        self.image_input = image[0]
        if self.image_input:
            self.in_chans = int(encoders[0].in_chans)
            self.in_dim = 0
        else:
            widths = {
                int(getattr(e, "in_dim", None) or m.in_dim) if e is not None else int(m.in_dim)
                for e, m in zip(encoders, copies, strict=True)
            }
            if len(widths) > 1:
                raise ExportError(
                    f"BagPredictor: the models take features of different widths {sorted(widths)}"
                )
            self.in_chans = 0
            self.in_dim = widths.pop()
        self.models = nn.ModuleList(copies)
        self._folds: list[MILModel] = copies
        self.encoders = encoders
        scalers = list(scalers) if scalers is not None else [None] * len(copies)
        if len(scalers) != len(copies):
            raise ExportError(f"BagPredictor: {len(scalers)} scalers for {len(copies)} models")
        width = max(self.clinical_dim, 1)
        arrays = [_scaler_arrays(s if self.clinical_dim else None, width) for s in scalers]
        for k, name in enumerate(("clinical_fill", "clinical_scale", "clinical_offset")):
            self.register_buffer(name, torch.tensor(np.stack([a[k] for a in arrays]), dtype=torch.float32))
        self.calibration = "none"
        self.platt = False
        weight, bias = np.ones(self.num_classes), np.zeros(self.num_classes)
        if calibrator is not None:
            self.calibration = str(calibrator.method)
            self.platt = calibrator.method == "platt"
            weight = np.asarray(calibrator.weight, dtype=np.float64).reshape(-1)
            bias = np.asarray(calibrator.bias, dtype=np.float64).reshape(-1)
            if not self.platt and weight.shape != (self.num_classes,):
                raise ExportError(
                    f"BagPredictor: the calibrator has {weight.shape[0]} classes, the models "
                    f"{self.num_classes}"
                )
        self.register_buffer("calibration_weight", torch.tensor(weight, dtype=torch.float32))
        self.register_buffer("calibration_bias", torch.tensor(bias, dtype=torch.float32))
        self.normalize = mean is not None and std is not None
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(shape))
            self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(shape))
        self.eval()  # always: dropout off, and stochastic training-only parts (ACMIL's masking) too
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> BagPredictor:
        """Inference only: the module stays in eval mode whatever ``mode`` is."""
        return super().train(False)

    def _fold(self, index: int, features: Tensor, clinical: Tensor | None) -> tuple[Tensor, Tensor]:
        model = self._folds[index]
        x = features.unsqueeze(0)  # (1, N, D): one bag, every position real
        mask = torch.ones_like(x[..., 0], dtype=torch.bool)
        c = None
        if clinical is not None and model.use_clinical:
            fill, scale, offset = (
                self.clinical_fill[index],
                self.clinical_scale[index],
                self.clinical_offset[index],
            )
            c = (torch.where(torch.isnan(clinical), fill, clinical) * scale + offset).unsqueeze(0)
        pooled = model.pooling.forward_aux(x, mask, clinical=c if model.pooling.use_clinical else None)
        head_clin = c if (model.head is not None and model.head.use_clinical) else None
        logits = model.forward_head(pooled.embedding, head_clin).logits
        return torch.softmax(logits.float(), dim=-1)[0], pooled.attention[0]

    def forward(self, instances: Tensor, clinical: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Predict one bag.

        Parameters
        ----------
        instances : Tensor
            ``(N, C, H, W)`` images or ``(N, D)`` features, float32, ``N >= 1``.
        clinical : Tensor or None
            ``(F,)`` raw clinical attributes (``NaN`` = missing); required
            when :attr:`clinical_dim` > 0.

        Returns
        -------
        (Tensor, Tensor, Tensor)
            ``probabilities (C,)``, ``attention (N,)`` and ``fold_probabilities (M, C)``.
        """
        x = instances.float()
        if self.normalize:
            x = (x - self.mean) / self.std
        if self.clinical_dim and clinical is None:
            raise ExportError(f"BagPredictor: clinical ({self.clinical_dim},) is required")
        c = clinical.float() if (clinical is not None and self.clinical_dim) else None
        probs, weights = [], []
        for i, encoder in enumerate(self.encoders):
            features = x if encoder is None else encoder(x)
            p, a = self._fold(i, features, c)
            probs.append(p)
            weights.append(a)
        fold_probabilities = torch.stack(probs)
        attention = torch.stack(weights).mean(dim=0)
        probabilities = fold_probabilities.mean(dim=0)
        if self.calibration != "none":
            z = torch.log(probabilities.clamp(_LOG_FLOOR, 1.0))
            if self.platt:
                d = z[1:2] - z[0:1]
                z = torch.cat([torch.zeros_like(d), self.calibration_weight * d + self.calibration_bias])
            else:
                z = z * self.calibration_weight + self.calibration_bias
            probabilities = torch.softmax(z, dim=-1)
        return probabilities, attention, fold_probabilities


# --------------------------------------------------------------------------- files


def _require(package: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ExportError(
            f"{package} is not installed: install the export extra, pip install 'milcell[export]' "
            "(onnx and onnxruntime)"
        ) from None


def _example(predictor: BagPredictor, n: int, image_size: int | None, seed: int) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    if predictor.image_input:
        if image_size is None:
            raise ExportError("export: image_size is required to export a model that takes images")
        x = torch.rand(n, predictor.in_chans, image_size, image_size, generator=g)
        if not predictor.normalize:
            x = (x - 0.45) / 0.25
    else:
        x = torch.randn(n, predictor.in_dim, generator=g)
    if not predictor.clinical_dim:
        return (x,)
    c = torch.rand(predictor.clinical_dim, generator=g) * 2.0
    if predictor.clinical_dim > 1 and not bool(torch.isnan(predictor.clinical_fill).any()):
        c[-1] = float("nan")  # every fold imputes a missing value: check it in the graph too
    return x, c


def _write_onnx(
    predictor: BagPredictor, example: tuple[Tensor, ...], path: Path, meta: Mapping[str, str]
) -> None:
    onnx = _require("onnx")
    names = ["instances", "clinical"][: len(example)]
    # ONNX has no expm1 (the lse pooling's accurate log-mean-exp): exp(x) - 1, exact to float32 rounding
    torch.onnx.register_custom_op_symbolic("aten::expm1", _expm1_symbolic, _OPSET)
    dynamic = {"instances": {0: "instances"}, "attention": {0: "instances"}}
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation and tracer notes
        torch.onnx.export(
            predictor,
            example,
            str(tmp),
            dynamo=False,
            input_names=names,
            output_names=["probabilities", "attention", "fold_probabilities"],
            dynamic_axes=dynamic,
            opset_version=_OPSET,
            do_constant_folding=True,
        )
        proto = onnx.load(str(tmp))
        del proto.metadata_props[:]
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.producer_name = "milcell"
        onnx.save(proto, str(tmp))


def _expm1_symbolic(g: Any, x: Any) -> Any:
    one = g.op("Constant", value_t=torch.tensor(1.0, dtype=torch.float32))
    return g.op("Sub", g.op("Exp", x), one)


def _write_torchscript(
    predictor: BagPredictor, example: tuple[Tensor, ...], path: Path, meta: Mapping[str, str]
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on Python values (checked by the verification)
        traced = torch.jit.trace(predictor, example, check_trace=False)
    extra = {_METADATA_FILE: json.dumps(dict(meta), sort_keys=True)}
    with atomic_path(path) as tmp:
        torch.jit.save(traced, str(tmp), _extra_files=extra)


def _runner(path: Path, format: str) -> Any:
    """A callable ``(inputs...) -> (probabilities, attention, fold_probabilities)`` numpy arrays."""
    if format == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            module = torch.jit.load(str(path))

        def run_ts(*inputs: Tensor) -> list[np.ndarray]:
            with torch.no_grad():
                return [o.numpy() for o in module(*inputs)]

        return run_ts
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run_onnx(*inputs: Tensor) -> list[np.ndarray]:
        feed = {name: t.numpy() for name, t in zip(names, inputs, strict=True)}
        return list(session.run(None, feed))

    return run_onnx


def _verify(predictor: BagPredictor, path: Path, format: str, image_size: int | None, what: str) -> None:
    """Compare the written file with ``predictor`` on bag sizes other than the traced one."""
    run = _runner(path, format)
    for n in _VERIFY_SIZES:
        inputs = _example(predictor, n, image_size, seed=n)
        with torch.no_grad():
            expected = [t.numpy() for t in predictor(*inputs)]
        try:
            got = run(*inputs)
        except Exception as exc:
            raise ExportError(
                f"export of {what}: the {format} file fails on a bag of {n} instances ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:300]})"
            ) from exc
        for name, e, g in zip(
            ("probabilities", "attention", "fold_probabilities"), expected, got, strict=True
        ):
            if e.shape != g.shape or not np.allclose(e, g, atol=_TOLERANCE, rtol=0.0):
                diff = float(np.max(np.abs(e - g))) if e.shape == g.shape else math.inf
                raise ExportError(
                    f"export of {what}: the {format} file's {name} differ from the model's on a bag of {n} "
                    f"instances (shape {g.shape} vs {e.shape}, max abs diff {diff:.3g}); the model's forward "
                    "pass depends on the bag size in a way tracing cannot record"
                )


def _metadata(predictor: BagPredictor, values: Mapping[str, Any]) -> dict[str, str]:
    """The metadata as strings: every value JSON-encoded (``json.loads`` reads each back)."""
    from milcell import __version__

    record: dict[str, Any] = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "milcell_version": __version__,
        "input": "images" if predictor.image_input else "features",
        "channels": predictor.in_chans or None,
        "feature_dim": predictor.in_dim or None,
        "normalize": predictor.normalize,
        "clinical_input": bool(predictor.clinical_dim),
        "folds": len(predictor.models),
        "vote": "soft",
        "calibration": predictor.calibration,
        "num_classes": predictor.num_classes,
        "inputs": ["instances", "clinical"] if predictor.clinical_dim else ["instances"],
        "outputs": ["probabilities", "attention", "fold_probabilities"],
    }
    record.update(values)
    return {k: json.dumps(v) for k, v in record.items()}


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata recorded in an exported file (JSON values decoded).

    Parameters
    ----------
    path : path-like
        A ``.onnx`` file (needs ``onnx``) or a TorchScript file from :func:`export_model`.

    Returns
    -------
    dict
        See the module docstring for the keys.

    Raises
    ------
    ExportError
        A file that milcell did not export.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"exported model '{file}' does not exist")
    raw: dict[str, str]
    if file.read_bytes()[:2] == b"PK":  # TorchScript files are zip archives
        extra = {_METADATA_FILE: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice (torch >= 2.10)
            torch.jit.load(str(file), _extra_files=extra)
        if not extra[_METADATA_FILE]:
            raise ExportError(f"'{file}' was not exported by milcell (it holds no {_METADATA_FILE})")
        raw = json.loads(extra[_METADATA_FILE])
    else:
        onnx = _require("onnx")
        try:
            proto = onnx.load(str(file), load_external_data=False)
        except Exception as exc:  # a file that is not ONNX
            raise ExportError(f"'{file}' is neither a TorchScript nor an ONNX file: {exc}") from None
        raw = {p.key: p.value for p in proto.metadata_props}
    try:
        out = {key: json.loads(value) for key, value in raw.items()}
    except json.JSONDecodeError:
        out = {}
    if out.get("format") != _FORMAT:
        raise ExportError(f"'{file}' was not exported by milcell (no format={_FORMAT!r} metadata)")
    return out


def export_model(
    model: nn.Module | Sequence[nn.Module],
    path: str | os.PathLike[str],
    format: str = "onnx",
    *,
    scalers: Sequence[Any | None] | None = None,
    calibrator: Any | None = None,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
    normalize: bool = False,
    class_names: Sequence[str] | None = None,
    clinical_names: Sequence[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    verify: bool = True,
) -> Path:
    """Export one :class:`~milcell.nn.model.MILModel` (or fold models, soft-voted) to one file.

    Parameters
    ----------
    model : MILModel or sequence of MILModel
        The model, or the fold models of an ensemble (one graph holds them all).
    path : path-like
        The file to write (written atomically).
    format : {"onnx", "torchscript"}, default "onnx"
        See the module docstring.
    scalers : sequence of ClinicalScaler or None, optional
        Each model's clinical scaling, put in the graph (None: the clinical input is used as given).
    calibrator : milcell.calibration.Calibrator, optional
        Applied to the voted probabilities.
    image_size : int, optional
        Side of the (square) images; required for a model that takes images.
    mean, std : sequence of float, optional
        The images' normalisation (recorded; inside the graph with ``normalize=True``).
    interpolation : str, optional
        The resize interpolation (recorded).
    normalize : bool, default False
        Put ``(x - mean) / std`` in the graph: ``instances`` are then images in ``[0, 1]``.
    class_names, clinical_names : sequence of str, optional
        Recorded in the metadata (default: ``"0", "1", ...`` and none).
    metadata : mapping, optional
        More JSON-serialisable metadata entries.
    verify : bool, default True
        Run the written file on bags of sizes other than the traced one and
        compare with PyTorch (max abs diff <= 1e-4); ONNX needs onnxruntime.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ExportError
        A pooling that cannot be exported to ``format`` (named, with the
        reason), a missing optional package, or a file that does not
        reproduce the model.
    ConfigError
        An invalid argument.

    Examples
    --------
    >>> import pathlib, tempfile, torch
    >>> from milcell.nn.model import create_mil_model
    >>> m = create_mil_model("milcell_mini_resnet", backbone_kwargs={"width": 4}, pooling="attention")
    >>> out = export_model(m, pathlib.Path(tempfile.mkdtemp()) / "m.pt", format="torchscript",
    ...                    image_size=32)
    >>> p, a, _ = torch.jit.load(str(out))(torch.randn(3, 3, 32, 32))
    >>> p.shape, a.shape
    (torch.Size([2]), torch.Size([3]))
    >>> export_model(create_mil_model(None, pooling="transmil", in_dim=8), out, format="torchscript")
    Traceback (most recent call last):
    ...
    milcell.exceptions.ExportError: pooling 'transmil' cannot be exported to torchscript: its PPEG ...
    """
    format = check_choice(format, "format", EXPORT_FORMATS)
    models = [model] if isinstance(model, nn.Module) else list(model)
    for m in models:
        name = _pooling_name(m)
        ok, reason = exportable(name, format)
        if not ok:
            raise ExportError(f"pooling {name!r} cannot be exported to {format}: {reason}")
    if normalize and (mean is None or std is None):
        raise ExportError("export: normalize=True needs mean and std")
    predictor = BagPredictor(
        models, scalers, calibrator, mean if normalize else None, std if normalize else None
    )
    if predictor.image_input:
        if image_size is None:
            raise ExportError("export: image_size is required to export a model that takes images")
        image_size = check_int(image_size, "image_size", low=1)
    if format == "onnx":
        _require("onnx")
        if verify:
            _require("onnxruntime")
    names = list(class_names) if class_names is not None else [str(i) for i in range(predictor.num_classes)]
    if len(names) != predictor.num_classes:
        raise ExportError(f"export: {len(names)} class_names for {predictor.num_classes} classes")
    clin = list(clinical_names or [])
    if clin and predictor.clinical_dim and len(clin) != predictor.clinical_dim:
        raise ExportError(f"export: {len(clin)} clinical_names for {predictor.clinical_dim} attributes")
    first = models[0]
    config = getattr(first, "config", None) or {}
    values: dict[str, Any] = {
        "class_names": names,
        "clinical_names": clin if predictor.clinical_dim else [],
        "image_size": image_size if predictor.image_input else None,
        "mean": list(mean) if mean is not None else None,
        "std": list(std) if std is not None else None,
        "interpolation": interpolation,
        "pooling": _pooling_name(first),
        "backbone": config.get("backbone"),
    }
    values.update(metadata or {})
    meta = _metadata(predictor, values)
    target = Path(path)
    example = _example(predictor, _TRACE_SIZE, image_size, seed=0)
    with checks(False), torch.no_grad():
        try:
            if format == "onnx":
                _write_onnx(predictor, example, target, meta)
            else:
                _write_torchscript(predictor, example, target, meta)
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(
                f"pooling {values['pooling']!r} could not be exported to {format}: {type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:500]}"
            ) from exc
        if verify:
            try:
                _verify(predictor, target, format, image_size, f"pooling {values['pooling']!r}")
            except ExportError:
                target.unlink(missing_ok=True)
                raise
    logger.info("exported %d model(s) to %s (%s)", len(models), target, format)
    return target


def export_run(
    run: Any,
    path: str | os.PathLike[str],
    format: str = "onnx",
    *,
    normalize: bool = False,
    calibrated: bool = True,
    verify: bool = True,
) -> Path:
    """Export a saved run's patient-level model: its fold models, soft-voted, in one file.

    The graph holds every fold model with its clinical scaling and, when the
    run has one (``calibrated=True``), its calibration. A run trained on cached
    features (:attr:`milcell.runs.SavedRun.features`) is exported at the
    feature level: ``instances`` are the bag's features ``(N, D)``, made by the
    recorded backbone and preprocessing (``features`` in the metadata).

    Parameters
    ----------
    run : SavedRun or path-like
        A run (:func:`milcell.runs.load_run`) or its folder.
    path : path-like
        The file to write.
    format : {"onnx", "torchscript"}, default "onnx"
        See the module docstring.
    normalize : bool, default False
        Image runs: put the mean/std normalisation in the graph (inputs in ``[0, 1]``).
    calibrated : bool, default True
        Include the run's calibration, when it has one.
    verify : bool, default True
        Check the written file against PyTorch on other bag sizes.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ExportError
        See :func:`export_model`.

    Examples
    --------
    A run trained on cached features (``load_run(folder)`` gives the same object):

    >>> import pathlib, tempfile
    >>> from milcell.nn.model import create_mil_model
    >>> from milcell.runs import SavedRun
    >>> record = {"class_names": ["reactive", "malignant"], "image_size": 32, "mean": [0.5] * 3,
    ...           "std": [0.25] * 3, "features": {"backbone": "milcell_mini_resnet_k8", "dim": 8}}
    >>> run = SavedRun(record, [create_mil_model(None, pooling="attention", in_dim=8)], [None])
    >>> path = export_run(run, pathlib.Path(tempfile.mkdtemp()) / "run.pt", format="torchscript")
    >>> meta = read_metadata(path)
    >>> meta["input"], meta["feature_dim"], meta["class_names"]
    ('features', 8, ['reactive', 'malignant'])
    """
    from milcell.runs import SavedRun, load_run

    if not isinstance(run, SavedRun):
        run = load_run(run)
    features = run.features
    prep = run.preprocessing
    calibration = run.calibration if calibrated else None
    extra: dict[str, Any] = {"features": features, "run": run.path.name if run.path is not None else None}
    if features is not None:
        fprep = features.get("preprocessing") or {}
        image_size = fprep.get("image_size", prep.image_size)
        mean, std = fprep.get("mean", list(prep.mean)), fprep.get("std", list(prep.std))
        interpolation = fprep.get("interpolation", prep.interpolation)
        if normalize:
            raise ExportError("export_run: normalize=True is for image runs; this run takes cached features")
    else:
        image_size, mean, std, interpolation = (
            prep.image_size,
            list(prep.mean),
            list(prep.std),
            prep.interpolation,
        )
    return export_model(
        run.models,
        path,
        format,
        scalers=run.scalers,
        calibrator=None if calibration is None else calibration.calibrator,
        image_size=image_size if features is None else None,
        mean=mean,
        std=std,
        interpolation=interpolation,
        normalize=normalize,
        class_names=run.class_names,
        clinical_names=run.clinical_names,
        metadata={**extra, "image_size": image_size},
        verify=verify,
    )
