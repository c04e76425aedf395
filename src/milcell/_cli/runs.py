"""What ``milcell train``, ``evaluate`` and ``predict`` do: data, cross-validation, saved runs.

A *saved run* is a folder::

    run/
      config.yaml, config.json   the resolved options (rerun with --config)
      run.json                   format, classes, clinical names, preprocessing, CV summary, models
      models/fold_<r>_<k>/       one model per fold:
        model.safetensors          weights (no pickle)
        model.json                 create_mil_model arguments + the fold's clinical scaling
      cv/                        cross_validate's working folders (checkpoints, metrics.csv; resume)
      folds.csv, oof_predictions.csv, summary.txt, roc.png, training_curves.png

Models are rebuilt with :meth:`milcell.nn.model.MILModel.from_config` and
:func:`milcell.train.checkpoint.load_weights`, so nothing is unpickled.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from milcell._utils import atomic_path
from milcell.data.bag import Bag
from milcell.data.datasets import BagDataset, InstanceDataset, select_instances
from milcell.data.records import BagCohort, CellSet, ClinicalScaler
from milcell.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms
from milcell.exceptions import CheckpointError, ConfigError, DataError
from milcell.metrics import binary_report, format_mean_std, multiclass_report, summarize_folds

__all__ = [
    "TABLE_METRICS",
    "BagView",
    "LoadedRun",
    "evaluate_run",
    "format_table",
    "load_run",
    "load_samples",
    "model_arguments",
    "predict_run",
    "train_run",
]

logger = logging.getLogger("milcell")

#: Metrics of the tables printed by the command, in order, with their column titles.
TABLE_METRICS: dict[str, str] = {
    "balanced_accuracy": "balanced acc.",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "auc": "AUC",
}
_MULTICLASS_METRICS: dict[str, str] = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced acc.",
    "f1_macro": "macro F1",
    "kappa": "kappa",
}
RUN_FORMAT = "milcell.run"
RUN_FORMAT_VERSION = 1


# --------------------------------------------------------------------------- data


def load_samples(fmt: str, data_dir: str | Path, split: str, class_names: Sequence[str] | None = None) -> Any:
    """Read ``data_dir`` in layout ``fmt``: a :class:`BagCohort` (dlmi) or a :class:`CellSet`.

    ``split`` is ``"train"``, ``"test"`` or ``"all"``. For ``dlmi`` it picks
    ``trainset/`` / ``testset/``; for ``imagefolder`` a ``train/`` or
    ``val/``/``test/`` subfolder when one exists (else ``data_dir`` itself);
    ``cnmc`` reads the training folds plus the labelled prelim set whatever the split.
    """
    root = Path(data_dir)
    if not root.exists():
        raise FileNotFoundError(f"data directory '{root}' does not exist")
    if not root.is_dir():
        raise ConfigError(f"--data-dir '{root}' is not a folder")
    if fmt == "dlmi":
        from milcell.data.formats.dlmi import load_dlmi

        return load_dlmi(root, split=split)  # type: ignore[arg-type]
    if fmt == "cnmc":
        from milcell.data.formats.cnmc import load_cnmc

        prelim = any((root / d).is_dir() for d in ("validation_data", "C-NMC_test_prelim_phase_data"))
        return load_cnmc(root, include_prelim=prelim)
    if fmt == "imagefolder":
        from milcell.data.formats.imagefolder import load_imagefolder

        names = {"train": ("train",), "test": ("val", "test"), "all": ()}[split]
        folder = next((root / n for n in names if (root / n).is_dir()), root)
        return load_imagefolder(folder, class_names=class_names)
    raise ConfigError(f"unknown --format {fmt!r}; expected one of 'dlmi', 'cnmc', 'imagefolder'")


def labels_and_groups(samples: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """``(n,)`` labels and ``(n,)`` patients (None: each sample is its own patient)."""
    if isinstance(samples, CellSet):
        return samples.labels, samples.groups
    return samples.labels, None


def fit_scaler(samples: Any, indices: np.ndarray) -> ClinicalScaler | None:
    """The fold's clinical scaling, fitted on its training rows only (None without clinical data)."""
    if not isinstance(samples, BagCohort) or not samples.clinical_names:
        return None
    return samples.fit_scaler(indices)


class BagView(Dataset[Bag]):
    """Bags decoded once and kept in memory, seen through a subset, a clinical scaling and augmentation.

    Parameters
    ----------
    bags : sequence of Bag
        Decoded bags ``(N_i, C, H, W)`` (clinical values raw).
    indices : sequence of int
        The bags of this view.
    scaler : ClinicalScaler or None
        Applied to the raw clinical values.
    train : bool
        Random instance subsets (``max_instances``) and, with ``augment``,
        random flips and quarter turns of every instance.
    """

    def __init__(
        self,
        bags: Sequence[Bag],
        indices: Sequence[int],
        scaler: ClinicalScaler | None,
        *,
        train: bool = False,
        augment: bool = False,
        max_instances: int | None = None,
        seed: int = 0,
    ) -> None:
        self.bags = bags
        self.indices = [int(i) for i in indices]
        self.train = train
        self.augment = augment
        self.max_instances = max_instances
        self.seed = seed
        self.calls = 0
        self.clinical: Tensor | None = None
        chosen = [bags[i] for i in self.indices]
        if chosen and chosen[0].clinical is not None:
            raw = torch.stack([b.clinical for b in chosen if b.clinical is not None]).double().numpy()
            self.clinical = torch.from_numpy(raw if scaler is None else scaler.transform(raw)).float()

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return np.array([self.bags[i].label for i in self.indices], dtype=np.int64)

    def __getitem__(self, index: int) -> Bag:
        bag = self.bags[self.indices[index]]
        x = bag.instances
        names = bag.instance_names
        self.calls += 1
        keep = select_instances(
            len(bag), self.max_instances, train=self.train, seed=self.seed, epoch=self.calls, index=index
        )
        if len(keep) < len(bag):
            x = x[torch.from_numpy(keep)]
            names = None if names is None else tuple(names[int(i)] for i in keep)
        if self.train and self.augment and x.ndim == 4 and x.shape[-1] == x.shape[-2]:
            n = x.shape[0]
            flip = torch.rand(n) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            turns = torch.randint(0, 4, (n,))
            x = torch.stack([torch.rot90(xi, int(k), dims=(-2, -1)) for xi, k in zip(x, turns, strict=True)])
        return Bag(
            x,
            label=bag.label,
            clinical=None if self.clinical is None else self.clinical[index],
            id=bag.id,
            instance_names=names,
        )


def decode_all(samples: Any, transform: Callable[[Any], Tensor], progress: bool, desc: str) -> list[Bag]:
    """Decode every bag (or cell, as a bag of one) once, with the evaluation transform."""
    from tqdm.auto import tqdm

    ds: Dataset[Bag] = (
        BagDataset(samples, transform=transform)
        if isinstance(samples, BagCohort)
        else InstanceDataset(samples, transform)
    )
    return [
        ds[i] for i in tqdm(range(len(ds)), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    ]


def make_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], train: bool
) -> Callable[[Any], Tensor]:
    """Resize to ``image_size`` and normalise; training adds flips and rotations."""
    cfg = {"input_size": (3, image_size, image_size), "mean": tuple(mean), "std": tuple(std)}
    return build_transforms(cfg, train=train)


def lazy_dataset(
    samples: Any,
    indices: Sequence[int] | np.ndarray,
    scaler: ClinicalScaler | None,
    cfg: Mapping[str, Any],
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
) -> Dataset[Bag]:
    """Images read from disk at every step (no memory cache)."""
    subset = samples.subset(np.asarray(indices, dtype=np.int64))
    transform = make_transform(cfg["image_size"], mean, std, train=train and cfg["augment"])
    if isinstance(samples, BagCohort):
        return BagDataset(
            subset,
            transform=transform,
            max_instances=cfg["max_instances"],
            train=train,
            seed=cfg["seed"],
            clinical_scaler=scaler,
        )
    return InstanceDataset(subset, transform)


# --------------------------------------------------------------------------- models


def model_arguments(
    cfg: Mapping[str, Any], num_classes: int, clinical_names: Sequence[str]
) -> dict[str, Any]:
    """``create_mil_model`` arguments for the options ``backbone``, ``pooling``, ``fusion``, ``inputs``."""
    inputs = cfg.get("inputs", "both")
    width = len(clinical_names)
    fusion = cfg.get("fusion")
    if inputs == "clinical":
        if width == 0:
            raise ConfigError("--inputs clinical needs a layout with clinical attributes (dlmi)")
        clinical_dim, use_image = width, False
        fusion = fusion or "concat"
    elif inputs == "image" or width == 0:
        clinical_dim, use_image = 0, True
        fusion = fusion or "linear"
    else:
        clinical_dim, use_image = width, True
        fusion = fusion or "concat"
    if use_image and clinical_dim and fusion == "linear":
        raise ConfigError(
            "--fusion linear uses the image only; choose concat, moe or gated to use the clinical "
            "attributes, or --inputs image"
        )
    return {
        "backbone": cfg["backbone"],
        "pooling": cfg["pooling"],
        "fusion": None if cfg["pooling"] == "instance_mean" else fusion,
        "num_classes": int(num_classes),
        "clinical_dim": clinical_dim,
        "pretrained": bool(cfg.get("pretrained", False)),
        "trainable": _trainable(cfg.get("trainable", "all")),
        "chunk_size": cfg.get("chunk_size"),
        "use_image": use_image,
    }


def _trainable(value: Any) -> str | int:
    text = str(value)
    return int(text) if text.isdigit() else text


def data_stats(backbone: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation of a backbone (ImageNet statistics for every timm model built without weights)."""
    return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name!r} is not a torch device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r}: CUDA is not available on this machine")
    return device


# --------------------------------------------------------------------------- training


@dataclass
class CVOutcome:
    """A finished cross-validation with what the command writes and prints."""

    name: str
    result: Any
    folds: list[Any]
    scalers: list[ClinicalScaler | None]
    model_args: dict[str, Any]


def run_cross_validation(
    name: str,
    samples: Any,
    cfg: Mapping[str, Any],
    model_args: Mapping[str, Any],
    output_dir: Path | None,
    bags: Sequence[Bag] | None = None,
) -> CVOutcome:
    """Patient-level cross-validation of one model (``cross_validate``), images cached when ``bags``."""
    from milcell.data.splits import patient_kfold
    from milcell.nn.model import create_mil_model
    from milcell.train.crossval import cross_validate

    labels, groups = labels_and_groups(samples)
    folds = patient_kfold(
        labels, groups, n_splits=cfg["folds"], n_repeats=cfg.get("repeats", 1), seed=cfg["seed"]
    )
    scalers = [fit_scaler(samples, f.train) for f in folds]
    by_fold = {(f.repeat, f.fold): s for f, s in zip(folds, scalers, strict=True)}
    mean, std = data_stats(model_args["backbone"])

    def make_datasets(fold: Any) -> tuple[Dataset[Bag], Dataset[Bag]]:
        scaler = by_fold.get((fold.repeat, fold.fold)) or fit_scaler(samples, fold.train)
        if bags is not None:
            common = {"max_instances": cfg["max_instances"], "seed": cfg["seed"]}
            return (
                BagView(bags, fold.train, scaler, train=True, augment=cfg["augment"], **common),
                BagView(bags, fold.val, scaler, train=False, **common),
            )
        return (
            lazy_dataset(samples, fold.train, scaler, cfg, mean, std, train=True),
            lazy_dataset(samples, fold.val, scaler, cfg, mean, std, train=False),
        )

    def build_model() -> nn.Module:
        return create_mil_model(**model_args)

    trainer_kwargs = {
        "max_epochs": cfg["epochs"],
        "lr": cfg["lr"],
        "precision": cfg["precision"],
        "progress": cfg["progress"],
        "device": resolve_device(cfg["device"]),
        "seed": cfg["seed"],
    }
    if cfg.get("monitor"):
        trainer_kwargs["monitor"] = cfg["monitor"]
    if cfg.get("patience"):
        trainer_kwargs["patience"] = cfg["patience"]
    class_names = getattr(samples, "class_names", None)
    if class_names:
        trainer_kwargs["class_names"] = list(class_names)
    logger.info("cross-validating %s: %d folds", name, len(folds))
    result = cross_validate(
        build_model,
        make_datasets,
        labels,
        groups,
        n_splits=cfg["folds"],
        n_repeats=cfg.get("repeats", 1),
        seed=cfg["seed"],
        batch_size=cfg["batch_size"],
        num_workers=cfg.get("num_workers", 0),
        sampler=None if cfg.get("sampler", "none") == "none" else cfg["sampler"],
        trainer_kwargs=trainer_kwargs,
        output_dir=output_dir,
        keep_models=True,
    )
    return CVOutcome(name, result, folds, scalers, dict(model_args))


def table_metrics(num_classes: int) -> dict[str, str]:
    return TABLE_METRICS if num_classes == 2 else _MULTICLASS_METRICS


def format_table(rows: Mapping[str, Mapping[str, tuple[float, float]]], metrics: Mapping[str, str]) -> str:
    """An aligned text table: one row per model, one ``mean ± std`` column per metric."""
    header = ["model", *metrics.values()]
    body = [
        [name, *(format_mean_std(*summary.get(key, (math.nan, math.nan))) for key in metrics)]
        for name, summary in rows.items()
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def save_models(outcome: CVOutcome, out: Path) -> list[dict[str, Any]]:
    """Write each fold model as safetensors + JSON; return the run.json entries."""
    import safetensors.torch

    entries = []
    models = list(outcome.result.models)
    if len(models) != len(outcome.folds):
        raise CheckpointError(
            f"cross-validation returned {len(models)} models for {len(outcome.folds)} folds; "
            "cannot save the run"
        )
    for fold, scaler, model in zip(outcome.folds, outcome.scalers, models, strict=True):
        rel = Path("models") / f"fold_{fold.repeat}_{fold.fold}"
        folder = out / rel
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "model.safetensors") as tmp:
            safetensors.torch.save_model(model.cpu(), str(tmp), force_contiguous=True)
        record = {
            "model_config": getattr(model, "config", None) or outcome.model_args,
            "clinical_scaler": None if scaler is None else scaler.to_dict(),
            "repeat": int(fold.repeat),
            "fold": int(fold.fold),
        }
        with atomic_path(folder / "model.json") as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        entries.append({"path": rel.as_posix(), "repeat": int(fold.repeat), "fold": int(fold.fold)})
    return entries


def write_oof(outcome: CVOutcome, path: Path, class_names: Sequence[str]) -> None:
    oof = outcome.result.oof
    prob = np.asarray(oof.probabilities, dtype=np.float64)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "label", "repeat", "fold", *(f"prob_{c}" for c in class_names)])
        for i, sample_id in enumerate(oof.ids):
            writer.writerow(
                [
                    sample_id,
                    int(oof.labels[i]),
                    int(oof.repeat[i]),
                    int(oof.fold[i]),
                    *(f"{p:.6f}" for p in prob[i]),
                ]
            )


def write_folds(outcome: CVOutcome, path: Path) -> None:
    rows = [dict(r) for r in outcome.result.folds]
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def roc_pairs(outcome: CVOutcome) -> list[tuple[np.ndarray, np.ndarray]]:
    """One ``(y_true, p_positive)`` pair per fold from the out-of-fold predictions."""
    oof = outcome.result.oof
    labels = np.asarray(oof.labels)
    prob = np.asarray(oof.probabilities)[:, 1]
    keys = sorted({(int(r), int(f)) for r, f in zip(oof.repeat, oof.fold, strict=True)})
    pairs = []
    for r, f in keys:
        sel = (np.asarray(oof.repeat) == r) & (np.asarray(oof.fold) == f)
        pairs.append((labels[sel], prob[sel]))
    return pairs


def save_figures(outcomes: Sequence[CVOutcome], out: Path, binary: bool) -> list[Path]:
    """``roc.png`` (binary problems) and ``training_curves.png`` of the first model's first fold."""
    from milcell.viz import plot_roc_comparison, plot_training_curves, save_figure

    written = []
    if binary:
        usable = {o.name: roc_pairs(o) for o in outcomes}
        usable = {k: [p for p in v if len(set(p[0].tolist())) == 2] for k, v in usable.items()}
        usable = {k: v for k, v in usable.items() if v}
        if usable:
            fig = plot_roc_comparison(usable, title="Out-of-fold ROC (mean ± std over folds)")
            written.append(save_figure(fig, out / "roc.png"))
    history = outcomes[0].result.histories[0] if outcomes[0].result.histories else []
    if history:
        fig = plot_training_curves(history, title=f"{outcomes[0].name}: training curves, fold 1")
        written.append(save_figure(fig, out / "training_curves.png"))
    return written


def train_run(cfg: Mapping[str, Any], out: Path) -> tuple[str, dict[str, Any]]:
    """``milcell train``: cross-validate one model on ``cfg['data_dir']`` and save the run to ``out``."""
    import milcell

    start = time.perf_counter()
    samples = load_samples(cfg["format"], cfg["data_dir"], "train")
    if isinstance(samples, BagCohort):
        samples = samples.labelled()
    class_names = list(samples.class_names)
    clinical_names = list(getattr(samples, "clinical_names", ()))
    model_args = model_arguments(cfg, len(class_names), clinical_names)
    mean, std = data_stats(model_args["backbone"])
    bags = None
    if cfg["cache_images"]:
        bags = decode_all(
            samples, make_transform(cfg["image_size"], mean, std, False), cfg["progress"], "decoding"
        )
    outcome = run_cross_validation("model", samples, cfg, model_args, out / "cv", bags)
    out.mkdir(parents=True, exist_ok=True)
    entries = save_models(outcome, out)
    write_oof(outcome, out / "oof_predictions.csv", class_names)
    write_folds(outcome, out / "folds.csv")
    metrics = table_metrics(len(class_names))
    table = format_table({cfg["pooling"]: outcome.result.summary}, metrics)
    with atomic_path(out / "summary.txt") as tmp:
        tmp.write_text(table + "\n", encoding="utf-8")
    figures = []
    try:
        figures = save_figures([outcome], out, binary=len(class_names) == 2)
    except ImportError as exc:  # matplotlib is the optional viz extra
        logger.warning("figures skipped: %s", exc)
    record = {
        "format": RUN_FORMAT,
        "format_version": RUN_FORMAT_VERSION,
        "milcell_version": milcell.__version__,
        "data_format": cfg["format"],
        "class_names": class_names,
        "clinical_names": clinical_names,
        "image_size": int(cfg["image_size"]),
        "mean": list(mean),
        "std": list(std),
        "max_instances": cfg["max_instances"],
        "summary": {k: list(v) for k, v in outcome.result.summary.items()},
        "models": entries,
        "seconds": round(time.perf_counter() - start, 1),
    }
    with atomic_path(out / "run.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    logger.info("saved run to %s (%s)", out, ", ".join(p.name for p in figures))
    return table, record


# --------------------------------------------------------------------------- saved runs


@dataclass
class LoadedRun:
    """A saved run read back: its record, fold models and their clinical scalings."""

    path: Path
    record: dict[str, Any]
    models: list[nn.Module]
    scalers: list[ClinicalScaler | None]


def load_run(path: str | Path) -> LoadedRun:
    """Rebuild the fold models of a saved run (safetensors + JSON, nothing unpickled)."""
    from milcell.nn.model import MILModel
    from milcell.train.checkpoint import load_weights

    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"run folder '{folder}' does not exist")
    record_path = folder / "run.json"
    if not record_path.is_file():
        raise CheckpointError(
            f"'{folder}' is not a saved milcell run: it has no run.json (train one with milcell train)"
        )
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"run record '{record_path}' is unreadable: {exc}") from exc
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT or not record.get("models"):
        raise CheckpointError(f"run record '{record_path}' is not a milcell run record")
    models, scalers = [], []
    for entry in record["models"]:
        # A shared run's record may not point the loader outside the run folder.
        model_dir = folder / str(entry.get("path", "")) if isinstance(entry, dict) else folder
        inside = model_dir.resolve()
        if inside == folder.resolve() or not inside.is_relative_to(folder.resolve()):
            raise CheckpointError(
                f"run record '{record_path}': model path {entry!r} is not a folder inside the run"
            )
        meta_path = model_dir / "model.json"
        if not meta_path.is_file():
            raise CheckpointError(f"model record '{meta_path}' is missing")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"model record '{meta_path}' is unreadable: {exc}") from exc
        model = MILModel.from_config(meta["model_config"])
        load_weights(model_dir / "model.safetensors", model)
        model.eval()
        models.append(model)
        scaler = meta.get("clinical_scaler")
        scalers.append(None if scaler is None else ClinicalScaler.from_dict(scaler))
    return LoadedRun(folder, record, models, scalers)


def _run_predictions(
    run: LoadedRun, samples: Any, cfg: Mapping[str, Any]
) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    """Each fold model's probabilities ``(n, C)`` and their vote."""
    from milcell.train.distributed import make_loader
    from milcell.train.ensemble import predict_ensemble, vote

    rec = run.record
    transform = make_transform(rec["image_size"], rec["mean"], rec["std"], train=False)
    device = resolve_device(cfg["device"])
    bags = decode_all(samples, transform, cfg["progress"], "decoding")
    per_model = []
    ids: list[str] = []
    for model, scaler in zip(run.models, run.scalers, strict=True):
        view = BagView(bags, range(len(bags)), scaler, train=False, max_instances=rec.get("max_instances"))
        loader = make_loader(view, cfg["batch_size"], shuffle=False, distributed=False)
        preds = predict_ensemble([model], loader, device=device, precision=cfg["precision"])
        ids = list(preds.ids)
        per_model.append(preds.probabilities.numpy())
    scores = vote([torch.from_numpy(p) for p in per_model], method=cfg["method"]).numpy()
    return ids, scores, per_model


def evaluate_run(cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``milcell evaluate``: metrics of a saved run's fold models (and their vote) on labelled data."""
    run = load_run(cfg["run"])
    rec = run.record
    data_dir = cfg.get("data_dir") or _saved_data_dir(run)
    samples = load_samples(rec["data_format"], data_dir, cfg["split"], rec["class_names"])
    labels, _ = labels_and_groups(samples)
    if (labels >= 0).sum() == 0:
        raise DataError(f"no labelled sample in '{data_dir}' (split {cfg['split']!r}); evaluate needs labels")
    _, scores, per_model = _run_predictions(run, samples, cfg)
    binary = len(rec["class_names"]) == 2

    def report(prob: np.ndarray) -> dict[str, float]:
        if binary:
            return binary_report(labels, prob[:, 1]).as_dict()
        return multiclass_report(labels, prob, class_names=rec["class_names"]).as_dict()

    ensemble = report(scores)
    folds = [report(p) for p in per_model]
    rows = {
        f"{cfg['method']} vote of {len(per_model)} models": {k: (v, math.nan) for k, v in ensemble.items()},
        "fold models (mean ± std)": summarize_folds(folds),
    }
    table = format_table(rows, table_metrics(len(rec["class_names"])))
    result = {"data_dir": str(data_dir), "split": cfg["split"], "ensemble": ensemble, "fold_models": folds}
    return table, result


def _saved_data_dir(run: LoadedRun) -> str:
    import yaml

    cfg_path = run.path / "config.yaml"
    saved = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    data_dir = (saved or {}).get("data_dir")
    if not data_dir:
        raise ConfigError(f"--data-dir is required: run '{run.path}' does not record its data folder")
    return str(data_dir)


def predict_run(cfg: Mapping[str, Any]) -> tuple[Path, int]:
    """``milcell predict``: write the vote of a saved run's models on ``cfg['data_dir']`` as CSV.

    For the lymphocytosis layout the file is the challenge submission
    ``Id,Predicted`` (one row per patient of the split, in CSV order);
    otherwise ``id,predicted,prob_<class>...``.
    """
    run = load_run(cfg["run"])
    rec = run.record
    data_dir = cfg.get("data_dir") or _saved_data_dir(run)
    split = cfg.get("split") or ("all" if rec["data_format"] == "cnmc" else "test")
    samples = load_samples(rec["data_format"], data_dir, split, rec["class_names"])
    ids, scores, _ = _run_predictions(run, samples, cfg)
    predicted = scores.argmax(axis=1)
    default_name = "submission.csv" if rec["data_format"] == "dlmi" else "predictions.csv"
    target = Path(cfg.get("output") or (run.path / default_name))
    with atomic_path(target) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        if rec["data_format"] == "dlmi":
            writer.writerow(["Id", "Predicted"])
            writer.writerows([sample_id, int(p)] for sample_id, p in zip(ids, predicted, strict=True))
        else:
            writer.writerow(["id", "predicted", *(f"prob_{c}" for c in rec["class_names"])])
            for sample_id, p, row in zip(ids, predicted, scores, strict=True):
                writer.writerow([sample_id, rec["class_names"][int(p)], *(f"{v:.6f}" for v in row)])
    return target, len(ids)
