"""Tests of milcell.export: ONNX and TorchScript files equal PyTorch on bags of any size."""

from __future__ import annotations

import functools
import inspect
import json
import re
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from milcell.calibration import Calibrator, RunCalibration
from milcell.data.bag import Bag, collate_bags
from milcell.data.records import ClinicalScaler
from milcell.exceptions import ConfigError, ExportError
from milcell.export import (
    EXPORT_FORMATS,
    NOT_EXPORTABLE,
    BagPredictor,
    export_model,
    export_run,
    exportable,
    read_metadata,
)
from milcell.nn.model import MILModel, create_mil_model
from milcell.nn.pooling import _POOLINGS, MILPooling, list_poolings, register_pooling
from milcell.runs import SavedRun

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning"),  # deprecated since torch 2.10, still works
]

SIZES = (1, 7, 198)  # none of them is the traced size (5) nor a size the export checks (1 is, 7/198 not)
TOL = 1e-4
DOCS = Path(__file__).resolve().parents[1] / "docs"
ONNX_REASON = "the export extra (onnx, onnxruntime) is not installed: pip install 'milcell[export]'"
# Poolings whose output is the class scores: they take no fusion head.
PREDICTION_LEVEL = {"instance_mean", "additive", "class_attention", "dsmil"}


def _needs(format: str) -> None:
    if format == "onnx":
        pytest.importorskip("onnx", reason=ONNX_REASON)
        pytest.importorskip("onnxruntime", reason=ONNX_REASON)


def _runner(path: Path, format: str) -> Callable[..., list[np.ndarray]]:
    """Run an exported file: ``(instances, [clinical]) -> [probabilities, attention, fold_probabilities]``."""
    if format == "torchscript":
        module = torch.jit.load(str(path))
        return lambda *xs: [o.numpy() for o in module(*xs)]
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda *xs: session.run(None, {n: x.numpy() for n, x in zip(names, xs, strict=True)})


def _reference(
    models: Sequence[MILModel], x: Tensor, clinical: Tensor | None, scalers: Sequence[Any] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's answer through ``MILModel.forward`` on a collated bag: vote, mean attention, folds."""
    probs, attention = [], []
    for i, model in enumerate(models):
        c = None
        if clinical is not None:
            raw = clinical.numpy()[None].astype(np.float64)
            scaler = scalers[i] if scalers is not None else None
            c = torch.from_numpy(
                scaler.transform(raw)[0] if scaler is not None else raw[0].astype(np.float32)
            )
        with torch.no_grad():
            out = model.eval()(collate_bags([Bag(x, clinical=c)]))
        probs.append(torch.softmax(out.logits.float(), -1)[0].numpy())
        attention.append(out.attention[0].numpy())
    folds = np.stack(probs)
    return folds.mean(0), np.mean(attention, 0), folds


def _feature_model(pooling: str, *, seed: int = 0, clinical_dim: int = 2, num_classes: int = 3) -> MILModel:
    torch.manual_seed(seed)
    fusion = None if pooling in PREDICTION_LEVEL else "concat" if clinical_dim else "linear"
    return create_mil_model(
        None, pooling=pooling, fusion=fusion, in_dim=8, clinical_dim=clinical_dim, num_classes=num_classes
    )


def _assert_close(got: Sequence[np.ndarray], want: Sequence[np.ndarray], what: str) -> None:
    for name, g, w in zip(("probabilities", "attention", "fold_probabilities"), got, want, strict=True):
        assert g.shape == w.shape, f"{what}: {name} shape {g.shape} != {w.shape}"
        diff = float(np.max(np.abs(g - w)))
        assert diff <= TOL, f"{what}: {name} max abs diff {diff:.3g}"


def _can(pooling: str, format: str) -> bool:
    return exportable(pooling, format)[0]


CASES = [(p, f) for p in list_poolings() for f in EXPORT_FORMATS]


# --------------------------------------------------------------------------- every pooling


@pytest.mark.parametrize(("pooling", "format"), [c for c in CASES if _can(*c)])
def test_exported_feature_model_equals_pytorch_on_unseen_bag_sizes(
    pooling: str, format: str, tmp_path: Path
) -> None:
    _needs(format)
    model = _feature_model(pooling)
    path = export_model(model, tmp_path / f"m.{format}", format=format)
    run = _runner(path, format)
    gen = torch.Generator().manual_seed(1)
    for n in SIZES:
        x = torch.randn(n, 8, generator=gen)
        clinical = torch.rand(2, generator=gen)
        _assert_close(run(x, clinical), _reference([model], x, clinical), f"{pooling} {format} N={n}")


@pytest.mark.parametrize(("pooling", "format"), [c for c in CASES if not _can(*c)])
def test_poolings_that_cannot_be_exported_say_which_and_why(
    pooling: str, format: str, tmp_path: Path
) -> None:
    reason = exportable(pooling, format)[1]
    assert reason
    with pytest.raises(ExportError, match=rf"pooling '{pooling}' cannot be exported to {format}: ") as info:
        export_model(_feature_model(pooling), tmp_path / "m", format=format)
    assert reason in str(info.value)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("pooling", sorted(NOT_EXPORTABLE))
def test_the_refused_poolings_really_fail_without_the_refusal(
    pooling: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reasons are not guesses: without the list, tracing or the check after it fails."""
    monkeypatch.setattr("milcell.export.NOT_EXPORTABLE", {})
    with pytest.raises(ExportError, match=rf"pooling '{pooling}'"):
        export_model(_feature_model(pooling), tmp_path / "m.pt", format="torchscript")
    assert not (tmp_path / "m.pt").exists()


def test_every_pooling_is_deterministic_in_eval_mode_or_refused() -> None:
    """Stochastic parts (ACMIL's masking, dropout) are training-only: eval outputs repeat exactly."""
    x, c = torch.randn(9, 8), torch.rand(2)
    for pooling in list_poolings():
        if not _can(pooling, "torchscript"):
            continue
        takes_dropout = "dropout" in inspect.signature(_POOLINGS.get(pooling)).parameters
        model = create_mil_model(
            None,
            pooling=pooling,
            fusion=None if pooling in PREDICTION_LEVEL else "concat",
            in_dim=8,
            clinical_dim=2,
            pooling_kwargs={"dropout": 0.5} if takes_dropout else {},
        )
        predictor = BagPredictor([model.train()])
        assert not predictor.training and not any(m.training for m in predictor.modules())
        first, again = predictor(x, c), predictor.train()(x, c)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True)), pooling


def test_the_traced_bag_size_is_not_baked_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Traced on 198 instances, the file still answers bags of 1 and 7 (and the check uses other sizes)."""
    _needs("onnx")
    monkeypatch.setattr("milcell.export._TRACE_SIZE", 198)
    model = _feature_model("gated_attention")
    for format in EXPORT_FORMATS:
        run = _runner(export_model(model, tmp_path / f"m.{format}", format=format), format)
        for n in (1, 7):
            x, c = torch.randn(n, 8), torch.rand(2)
            _assert_close(run(x, c), _reference([model], x, c), f"{format} N={n}")


class _FirstHalfMean(MILPooling):
    """Mean of the first half of the bag, its length read as a Python int: tracing fixes it."""

    def _pool(self, x: Tensor, mask: Tensor, clinical: Tensor | None) -> tuple[Tensor, Tensor]:
        half = max(1, int(x.shape[1]) // 2)
        weights = torch.zeros_like(x[..., 0])
        weights[:, :half] = 1.0 / half
        return (weights.unsqueeze(-1) * x).sum(1), weights


def test_a_model_whose_graph_depends_on_the_bag_size_is_refused(tmp_path: Path) -> None:
    if "test_first_half_mean" not in list_poolings():
        register_pooling("test_first_half_mean")(_FirstHalfMean)
    model = create_mil_model(None, pooling="test_first_half_mean", in_dim=8)
    with pytest.raises(ExportError, match="differ from the model's on a bag of 1 instances.*bag size"):
        export_model(model, tmp_path / "m.pt", format="torchscript")
    assert not (tmp_path / "m.pt").exists()
    # without the check the file is written, and it is wrong on other sizes
    path = export_model(model, tmp_path / "m.pt", format="torchscript", verify=False)
    x = torch.randn(12, 8)
    got = _runner(path, "torchscript")(x)
    assert np.abs(got[1] - _reference([model], x, None)[1]).max() > 0.01


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_exported_predictions_ignore_the_order_of_the_instances(n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, c = torch.randn(n, 8, generator=gen), torch.rand(2, generator=gen)
    perm = torch.randperm(n, generator=gen)
    traced = _traced_attention_model()
    p, a, _ = traced(x, c)
    p2, a2, _ = traced(x[perm], c)
    torch.testing.assert_close(p2, p, atol=1e-5, rtol=0)
    torch.testing.assert_close(a2, a[perm], atol=1e-5, rtol=0)


@functools.cache
def _traced_attention_model() -> torch.jit.ScriptModule:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on the Python-side shape checks, deprecations
        return torch.jit.trace(
            BagPredictor([_feature_model("gated_attention")]), (torch.randn(5, 8), torch.rand(2))
        )


# --------------------------------------------------------------------------- images, ensembles, scaling


def _image_model(seed: int, pooling: str = "gated_attention") -> MILModel:
    torch.manual_seed(seed)
    return create_mil_model(
        "milcell_mini_resnet",
        backbone_kwargs={"width": 4},
        pooling=pooling,
        fusion="concat",
        clinical_dim=3,
        chunk_size=4,  # chunking is a training-time memory bound: the export runs the backbone once
    )


def _scaler(seed: int) -> ClinicalScaler:
    rng = np.random.default_rng(seed)
    return ClinicalScaler(["age", "lymph_count", "sex"]).fit(rng.normal(50.0, 10.0, size=(20, 3)))


@pytest.mark.slow
@pytest.mark.parametrize("format", EXPORT_FORMATS)
def test_image_fold_ensemble_with_scaling_and_calibration_equals_pytorch(format: str, tmp_path: Path) -> None:
    _needs(format)
    models = [_image_model(0), _image_model(1)]
    scalers = [_scaler(0), _scaler(1)]
    cal = Calibrator.from_dict(
        {
            "format": "milcell-calibrator",
            "version": 1,
            "method": "temperature",
            "num_classes": 2,
            "temperature": 1.7,
        }
    )
    path = export_model(
        models,
        tmp_path / "m",
        format=format,
        scalers=scalers,
        calibrator=cal,
        image_size=32,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        class_names=["reactive", "malignant"],
        clinical_names=["age", "lymph_count", "sex"],
    )
    run = _runner(path, format)
    gen = torch.Generator().manual_seed(3)
    for n in SIZES:
        x = torch.randn(n, 3, 32, 32, generator=gen)
        clinical = torch.tensor([61.0, float("nan"), 1.0])  # a missing value: imputed in the graph
        vote, attention, folds = _reference(models, x, clinical, scalers)
        calibrated = cal.transform_probabilities(vote[None].astype(np.float64)).astype(np.float32)[0]
        _assert_close(run(x, clinical), [calibrated, attention, folds], f"{format} N={n}")
    meta = read_metadata(path)
    assert meta["calibration"] == "temperature" and meta["folds"] == 2 and meta["input"] == "images"
    assert meta["clinical_names"] == ["age", "lymph_count", "sex"] and meta["mean"] == [0.5] * 3


@pytest.mark.parametrize("method", ["temperature", "vector", "platt"])
def test_every_calibration_method_is_applied_in_the_graph(method: str) -> None:
    logits = np.random.default_rng(0).normal(size=(60, 2)) * 3
    labels = (np.random.default_rng(1).uniform(size=60) < 0.5).astype(int)
    cal = Calibrator(method).fit(logits, labels)
    model = _feature_model("attention", num_classes=2)
    predictor = BagPredictor([model], calibrator=cal)
    x, c = torch.randn(6, 8), torch.rand(2)
    p, _, folds = predictor(x, c)
    expected = cal.transform_probabilities(folds.mean(0, keepdim=True).double().numpy())[0]
    np.testing.assert_allclose(p.numpy(), expected, atol=1e-5)
    assert predictor.calibration == method


def test_normalisation_inside_the_graph_takes_images_in_unit_range(tmp_path: Path) -> None:
    model = _image_model(0, pooling="mean")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    path = export_model(
        model, tmp_path / "m.pt", format="torchscript", image_size=32, mean=mean, std=std, normalize=True
    )
    images = torch.rand(4, 3, 32, 32)
    normalised = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    c = torch.rand(3)
    _assert_close(_runner(path, "torchscript")(images, c), _reference([model], normalised, c), "normalize")
    assert read_metadata(path)["normalize"] is True


def test_export_arguments_are_checked(tmp_path: Path) -> None:
    feature = _feature_model("mean")
    with pytest.raises(ConfigError, match="format"):
        export_model(feature, tmp_path / "m", format="tflite")
    with pytest.raises(ExportError, match="image_size is required"):
        export_model(_image_model(0, "mean"), tmp_path / "m.pt", format="torchscript")
    with pytest.raises(ExportError, match="normalize=True needs mean and std"):
        export_model(feature, tmp_path / "m.pt", format="torchscript", normalize=True)
    with pytest.raises(ExportError, match="2 class_names for 3 classes"):
        export_model(feature, tmp_path / "m.pt", format="torchscript", class_names=["a", "b"])
    with pytest.raises(ExportError, match="clinical-only"):
        export_model(
            create_mil_model(None, in_dim=4, clinical_dim=2, fusion="concat", use_image=False),
            tmp_path / "m.pt",
        )
    with pytest.raises(ExportError, match="models\\[1\\] has 2 classes"):
        BagPredictor([feature, _feature_model("mean", num_classes=2)])
    with pytest.raises(ExportError, match="not exported by milcell"):
        torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.randn(1, 2)), str(tmp_path / "plain.pt"))
        read_metadata(tmp_path / "plain.pt")


# --------------------------------------------------------------------------- saved runs


def _saved_run(tmp_path: Path, *, features: bool, calibrated: bool) -> SavedRun:
    models = [_feature_model("gated_attention", seed=s, clinical_dim=3, num_classes=2) for s in (0, 1)]
    if not features:
        models = [_image_model(s) for s in (0, 1)]
    record: dict[str, Any] = {
        "class_names": ["reactive", "malignant"],
        "clinical_names": ["age", "lymph_count", "sex"],
        "image_size": 32,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bicubic",
    }
    if features:
        record["features"] = {"backbone": "milcell_mini_resnet_k8", "image_size": 32, "dim": 8}
    if calibrated:
        probs = np.random.default_rng(0).dirichlet([1, 1], size=30)
        labels = (probs[:, 1] > 0.5).astype(int)
        cal = Calibrator("vector").fit(np.log(probs), labels)
        record["calibration"] = RunCalibration(cal, probs, labels).to_dict()
    return SavedRun(record, models, [_scaler(0), _scaler(1)], path=tmp_path / "myrun")


def test_export_run_of_a_feature_run_puts_scaling_and_calibration_in_the_graph(tmp_path: Path) -> None:
    run = _saved_run(tmp_path, features=True, calibrated=True)
    path = export_run(run, tmp_path / "run.pt", format="torchscript")
    meta = read_metadata(path)
    assert meta["input"] == "features" and meta["feature_dim"] == 8 and meta["features"]["dim"] == 8
    assert meta["calibration"] == "vector" and meta["class_names"] == ["reactive", "malignant"]
    assert meta["interpolation"] == "bicubic" and meta["run"] == "myrun"
    x, clinical = torch.randn(11, 8), torch.tensor([40.0, 55.0, float("nan")])
    vote, attention, folds = _reference(run.models, x, clinical, run.scalers)
    assert run.calibration is not None
    calibrated = run.calibration.calibrator.transform_probabilities(vote[None].astype(np.float64))[0]
    _assert_close(_runner(path, "torchscript")(x, clinical), [calibrated, attention, folds], "feature run")
    uncalibrated = export_run(run, tmp_path / "raw.pt", format="torchscript", calibrated=False)
    _assert_close(_runner(uncalibrated, "torchscript")(x, clinical), [vote, attention, folds], "uncalibrated")
    with pytest.raises(ExportError, match="normalize=True is for image runs"):
        export_run(run, tmp_path / "n.pt", format="torchscript", normalize=True)


def test_export_model_refuses_a_missing_onnx_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(ExportError, match=re.escape("pip install 'milcell[export]'")):
        export_model(_feature_model("mean"), tmp_path / "m.onnx", format="onnx")


@pytest.mark.slow
def test_import_milcell_export_loads_neither_onnx_nor_onnxruntime() -> None:
    code = "import sys, milcell.export; print(sorted(m for m in ('onnx', 'onnxruntime') if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.strip() == "[]"


# --------------------------------------------------------------------------- command line and docs


@pytest.mark.slow
def test_cli_exports_a_trained_run_that_agrees_with_its_predictions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _needs("onnx")
    from milcell.cli import main
    from milcell.data.formats.dlmi import load_dlmi
    from milcell.data.synthetic import make_cohort
    from milcell.runs import train_run

    cohort = make_cohort(tmp_path / "dlmi", n_patients=16, seed=1, image_size=32, bag_size=(2, 4))
    run = train_run(
        load_dlmi(cohort, "train"),
        tmp_path / "run",
        pooling="gated_attention",
        fusion="concat",
        folds=2,
        epochs=1,
        batch_size=4,
        image_size=32,
        max_instances=4,
        figures=False,
        device="cpu",
        data_format="dlmi",
        calibrate="temperature",
    )
    target = tmp_path / "out" / "model.onnx"
    assert main(["export", str(tmp_path / "run"), "--format", "onnx", "--output", str(target)]) == 0
    assert (
        f"exported 2 fold model(s) (gated_attention, 32 px images, calibration: temperature) to {target}"
        in (capsys.readouterr().out)
    )
    test = load_dlmi(cohort, "test")
    preds = run.predict(test)
    assert preds.calibrated is not None
    dataset = run.dataset(test, 0)
    onnx_run = _runner(target, "onnx")
    for k in range(len(test)):
        raw = torch.tensor(test[k].clinical, dtype=torch.float32)
        got = onnx_run(dataset[k].instances, raw)
        folds = np.stack([f[k] for f in preds.fold_probabilities])
        np.testing.assert_allclose(got[0], preds.calibrated[k], atol=TOL)
        np.testing.assert_allclose(got[2], folds, atol=TOL)
    assert main(["export", str(tmp_path / "run"), "--format", "torchscript"]) == 0
    assert read_metadata(tmp_path / "run" / "model.pt")["folds"] == 2
    assert main(["export", str(tmp_path / "no-such-run")]) == 2
    assert "milcell: error:" in capsys.readouterr().err


def _doc_script() -> str:
    text = (DOCS / "export.rst").read_text(encoding="utf-8")
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:(?: {3}.*)?\n)+)", text)
    script = [b for b in blocks if "# milcell: inference with onnxruntime and numpy only" in b]
    assert len(script) == 1, "docs/export.rst must hold the inference script once"
    return textwrap.dedent(script[0])


def test_the_docs_inference_script_runs_on_an_exported_file(tmp_path: Path) -> None:
    _needs("onnx")
    script = _doc_script()
    assert re.findall(r"^(?:import|from) (\w+)", script, flags=re.M) == ["json", "numpy", "onnxruntime"]
    model = _image_model(0)
    export_model(
        model,
        tmp_path / "model.onnx",
        format="onnx",
        image_size=32,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        class_names=["reactive", "malignant"],
        clinical_names=["age", "lymph_count", "sex"],
    )
    (tmp_path / "infer.py").write_text(script, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "infer.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    probs = json.loads(lines[0].replace("'", '"'))
    assert set(probs) == {"reactive", "malignant"} and sum(probs.values()) == pytest.approx(1.0, abs=2e-3)
    assert lines[1].startswith("most attended cells:")


def test_cli_export_help_names_the_formats(capsys: pytest.CaptureFixture[str]) -> None:
    from milcell.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["export", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: milcell export") and "RUN" in out and "{onnx,torchscript}" in out
    assert main(["export", "run", "--format", "tflite"]) == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
