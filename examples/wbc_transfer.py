"""White-cell-type report: five classes, ResNet-18 transfer learning with extra information.

Reproduces Table 1 of the report (report 4 of the documentation's References page): basophil, eosinophil,
lymphocyte, monocyte and neutrophil cells (the ``imagefolder`` layout, masks for ~10 % of the training
images), best validation accuracy when training on 100 / 50 / 10 / 1 % of the training images,
*without* and *with* extra information. Each cell is a bag of one (``InstanceDataset``).

* **Without extra info**: ResNet-18 (ImageNet with ``--pretrained``) with only its last two residual
  stages trainable (``trainable=2``), a new 5-way head; flips, rotation, normalisation.
* **With extra info** (every route of the report):

  1. a binary classifier pretrained on an *auxiliary labelled* set with the first convolution and the
     first stage frozen (``trainable=3``): here the synthetic C-NMC cells, ALL vs HEM (or
     ``--aux-dir``, any C-NMC layout);
  2. the report's alternative when that set has no labels: backbone features (VGG16 in full mode) ->
     PCA(100) -> k-means(2) pseudo-labels (scikit-learn), then the same pretraining on them;
  3. a small convolutional autoencoder (written below; 512-d latent in full mode) trained on the
     *unlabelled* training images, its encoder then a second, frozen feature extractor;
  4. masks applied to the input where present (``InstanceDataset(apply_mask=True)``);
  5. the pretrained ResNet-18 (fine-tuned, last two stages) and the frozen encoder concatenated
     (512 + 512 = 1,024-d) -> 5-way head.

  Table 1 gets one "with" column per pretraining route (labelled auxiliary set, k-means pseudo-labels).

``--quick`` substitutes timm's tiny ``test_resnet`` (4 stages like ResNet-18) at 48 px on 24 synthetic
smears (472 training / 131 validation cells; 1 % is then 5 images, one per class, where the report had
84), a 64-d latent, Adam lr 2e-3, batch 8 (last partial batch dropped for BatchNorm) and 8 epochs for
every row (245 synthetic C-NMC cells, 5 epochs, for the auxiliary pretraining); ``--smoke`` uses 32 px,
a 16-d latent, one epoch and only the 100 % fraction. Without ``--pretrained`` (no network here) every
network starts from random weights, so the k-means clusters of random features barely match the
hidden labels (the script prints their adjusted Rand index). The numbers
measured with ``--quick`` (seed 0, ``--threads 1``), and what they show, are in
``docs/reports_single_cell.rst`` (kept in one place, so that they are re-measured there).

Run::

    python examples/wbc_transfer.py --smoke                   # CI check, < 1 min
    python examples/wbc_transfer.py --quick                   # ~3 CPU-minutes
    python examples/wbc_transfer.py                           # the report's protocol (hours; GPU advised)
    python examples/wbc_transfer.py --data-dir WBC --aux-dir C-NMC_Leukemia --pretrained --device cuda

``--data-dir`` holds ``train/`` (``data/<Class>/``, ``mask/<Class>/``) and ``val/`` (see
``milcell.data.formats.imagefolder``). Prints Table 1 (rows: training fraction; columns: best
validation accuracy % without / with extra information, ours and published) and writes it as
CSV/markdown into ``--output-dir``.
"""

from __future__ import annotations

import itertools
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import make_parser, print_header, print_table, setup, write_config
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score
from sklearn.model_selection import train_test_split
from torch import nn

from milcell.data import CellRecord, CellSet, InstanceDataset, build_transforms
from milcell.data.formats.cnmc import load_cnmc
from milcell.data.formats.imagefolder import load_imagefolder
from milcell.data.synthetic import WBC_CLASSES, make_cohort
from milcell.nn.backbones import create_backbone
from milcell.nn.encoder import InstanceEncoder
from milcell.nn.fusion import create_fusion
from milcell.nn.model import MILModel, create_mil_model
from milcell.nn.pooling import create_pooling
from milcell.train import Trainer, make_loader
from milcell.train.features import extract_features

#: Table 1 of the report: best test accuracy (%) in 30 epochs, without / with extra information.
PUBLISHED = {1.0: (97.90, 97.60), 0.5: (97.50, 97.20), 0.1: (95.10, 95.00), 0.01: (80.00, 80.80)}


class ConvAutoencoder(nn.Module):
    """Four stride-2 convolutions -> ``latent`` vector -> four transposed convolutions; no BatchNorm."""

    def __init__(self, img_size: int, latent: int, width: int = 16) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 8 * width]
        self.side = img_size // 16
        down = [m for a, b in itertools.pairwise(chans) for m in (nn.Conv2d(a, b, 3, 2, 1), nn.ReLU())]
        self.encoder = nn.Sequential(*down, nn.Flatten(), nn.Linear(chans[-1] * self.side**2, latent))
        self.encoder.num_features = latent  # type: ignore[assignment]  (read by InstanceEncoder)
        up = [
            m
            for a, b in zip(chans[:0:-1], chans[-2::-1], strict=True)
            for m in (nn.ConvTranspose2d(a, b, 4, 2, 1), nn.ReLU())
        ]
        self.decoder = nn.Sequential(
            nn.Linear(latent, chans[-1] * self.side**2),
            nn.Unflatten(1, (chans[-1], self.side, self.side)),
            *up[:-1],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, 3, H, W)`` -> reconstruction ``(n, 3, H, W)``."""
        return self.decoder(self.encoder(x))


class ConcatFeatures(nn.Module):
    """Two feature extractors side by side: ``(n, C, H, W)`` -> ``(n, D1 + D2)``."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second
        self.num_features = int(first.num_features) + int(second.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.first(x), self.second(x)], dim=1)


def load_data(args: Any, cfg: dict[str, Any]) -> tuple[CellSet, CellSet, CellSet]:
    """WBC train and val cells, and the auxiliary binary set (real folders or synthetic cohorts)."""
    root = args.data_dir
    if root is None:
        root = args.output_dir / f"synthetic_wbc_{cfg['smears']}s_{cfg['img_size']}px_seed{args.seed}"
        if not (root / "val").is_dir():  # val/ is written after train/
            shutil.rmtree(root, ignore_errors=True)
            make_cohort(root, cfg["smears"], args.seed, "imagefolder", cfg["img_size"], cfg["cells"])
    aux_root = args.aux_dir
    if aux_root is None:
        aux_root = (
            args.output_dir / f"synthetic_aux_{cfg['aux_patients']}p_{cfg['img_size']}px_seed{args.seed}"
        )
        if not (aux_root / "validation_data").is_dir():
            shutil.rmtree(aux_root, ignore_errors=True)
            make_cohort(
                aux_root, cfg["aux_patients"], args.seed + 1, "cnmc", cfg["img_size"], cfg["aux_cells"]
            )
    train = load_imagefolder(root / "train")
    val = load_imagefolder(root / "val", class_names=train.class_names)
    return train, val, load_cnmc(aux_root, include_prelim=False)


def fit(
    model: nn.Module, train: InstanceDataset, val: InstanceDataset | None, epochs: int, cfg: dict, args: Any
) -> Trainer:
    """Adam; keeps the epoch of best validation accuracy (if a validation set is given)."""
    trainer = Trainer(
        model,
        lr=cfg["lr"],
        max_epochs=epochs,
        monitor="val_accuracy" if val is not None else "train_loss",
        progress=False,
        device=args.device,
        seed=args.seed,
    )
    batch = cfg["batch_size"]  # drop the last partial batch (BatchNorm), unless it is the only one
    loader = make_loader(train, batch, shuffle=True, seed=args.seed, drop_last=len(train) >= batch)
    trainer.fit(loader, None if val is None else make_loader(val, 64, shuffle=False))
    return trainer


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--aux-dir", type=Path, default=None, help="C-NMC-layout auxiliary set")
    args = parser.parse_args()
    profile = setup(args, __file__)
    cfg = profile.settings(
        smears=(6, 24, 400),
        cells=((4, 6), (20, 30), (15, 30)),
        aux_patients=(6, 30, 60),
        aux_cells=((2, 3), (8, 12), (30, 60)),
        img_size=(32, 48, 224),
        backbone=("test_resnet", "test_resnet", "resnet18"),
        cluster_backbone=("test_resnet", "test_resnet", "vgg16"),
        latent=(16, 64, 512),
        lr=(2e-3, 2e-3, 1e-3),
        batch_size=(8, 8, 32),
        epochs=(1, 8, 30),
        aux_epochs=(1, 5, 10),
        ae_epochs=(1, 8, 30),
        fractions=((1.0,), (1.0, 0.5, 0.1, 0.01), (1.0, 0.5, 0.1, 0.01)),
    )
    notes = [
        f"backbone {cfg['backbone']} at {cfg['img_size']} px"
        + ("" if profile.full else " (substitute for ResNet-18 at 224 px)")
        + f", last two stages trainable; Adam lr {cfg['lr']}, batch {cfg['batch_size']}, "
        f"{cfg['epochs']} epochs (report: 30)",
        f"auxiliary binary set: {'C-NMC ' + str(args.aux_dir) if args.aux_dir else 'synthetic C-NMC cells'}"
        f", pretrained with stem + first stage frozen; k-means route on {cfg['cluster_backbone']} features",
        f"autoencoder latent {cfg['latent']} (report: 512) on the unlabelled training images",
    ]
    print_header(
        "White-cell types: ResNet-18 transfer learning with extra information (Table 1)", args, profile, notes
    )
    write_config(args, cfg)
    start = time.perf_counter()
    train, val, aux = load_data(args, cfg)
    counts = np.bincount(train.labels, minlength=len(train.class_names)).tolist()
    print(
        f"train {len(train)} images {dict(zip(train.class_names, counts, strict=True))}, "
        f"{sum(r.mask_path is not None for r in train)} with masks; val {len(val)}; auxiliary {len(aux)}"
    )

    size = cfg["img_size"]
    data_config = {**create_backbone(cfg["backbone"]).data_config, "input_size": (3, size, size)}
    train_tf, eval_tf = build_transforms(data_config, train=True), build_transforms(data_config, train=False)

    def binary_model() -> MILModel:  # first convolution + first stage frozen
        return create_mil_model(cfg["backbone"], pooling="mean", pretrained=args.pretrained, trainable=3)

    # 1. pretraining on the labelled auxiliary set
    t0 = time.perf_counter()
    aux_labelled = binary_model()
    fit(aux_labelled, InstanceDataset(aux, train_tf), None, cfg["aux_epochs"], cfg, args)
    # 2. the alternative: features -> PCA(100) -> k-means(2) pseudo-labels on the same images, labels unseen
    clusterer = create_backbone(cfg["cluster_backbone"], pretrained=args.pretrained, trainable="head")
    feats = extract_features(clusterer, InstanceDataset(aux, eval_tf), None, batch_size=64, progress=False)
    x = torch.cat([feats[i].instances for i in range(len(feats))]).numpy()
    x = PCA(n_components=min(100, *x.shape), random_state=args.seed).fit_transform(x)
    clusters = KMeans(2, n_init=10, random_state=args.seed).fit_predict(x)
    print(
        f"k-means pseudo-labels: sizes {np.bincount(clusters).tolist()}, "
        f"adjusted Rand index vs the hidden labels {adjusted_rand_score(aux.labels, clusters):.2f}"
    )
    records = [CellRecord(r.path, int(c), r.patient, r.mask_path) for r, c in zip(aux, clusters, strict=True)]
    aux_kmeans = binary_model()
    pseudo = CellSet(records, class_names=("cluster0", "cluster1"), root=aux.root)
    fit(aux_kmeans, InstanceDataset(pseudo, train_tf), None, cfg["aux_epochs"], cfg, args)
    print(f"auxiliary pretraining (labelled and k-means) done in {time.perf_counter() - t0:.0f} s")

    # 3. autoencoder on the unlabelled training images (reconstructs the normalised input)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    ae = ConvAutoencoder(size, cfg["latent"]).to(args.device)
    opt = torch.optim.Adam(ae.parameters(), lr=cfg["lr"])
    loader = make_loader(InstanceDataset(train, train_tf), cfg["batch_size"], shuffle=True, seed=args.seed)
    for _ in range(cfg["ae_epochs"]):
        for batch in loader:
            x = batch.instances.to(args.device)
            loss = nn.functional.mse_loss(ae(x), x)
            opt.zero_grad()
            loss.backward()
            opt.step()
    ae.requires_grad_(False).eval()
    print(f"autoencoder: final reconstruction MSE {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")

    def with_extra(pretrained: MILModel) -> MILModel:
        """Aux-pretrained backbone (last two stages trainable) + frozen AE encoder -> 5-way head."""
        backbone = create_backbone(cfg["backbone"], trainable=2)
        backbone.model.load_state_dict(pretrained.encoder.backbone.model.state_dict())
        features = ConcatFeatures(backbone, ae.encoder)
        dim = features.num_features
        head = create_fusion("linear", dim, 0, len(WBC_CLASSES))
        return MILModel(create_pooling("mean", dim), head, encoder=InstanceEncoder(features)).to(args.device)

    # 4. training-fraction study
    val_plain, val_masked = InstanceDataset(val, eval_tf), InstanceDataset(val, eval_tf, apply_mask=True)
    rows = []
    for fraction in cfg["fractions"]:
        t0 = time.perf_counter()
        idx = np.arange(len(train))
        n = max(round(fraction * len(train)), len(train.class_names))
        if n < len(train):
            idx, _ = train_test_split(idx, train_size=n, stratify=train.labels, random_state=args.seed)
        subset = train.subset(np.sort(idx))
        accuracy = {}
        torch.manual_seed(args.seed)
        plain = create_mil_model(
            cfg["backbone"],
            pooling="mean",
            num_classes=len(WBC_CLASSES),
            pretrained=args.pretrained,
            trainable=2,
        )
        accuracy["without"] = fit(
            plain, InstanceDataset(subset, train_tf), val_plain, cfg["epochs"], cfg, args
        ).best_value
        for route, aux_model in (("labelled aux", aux_labelled), ("k-means aux", aux_kmeans)):
            torch.manual_seed(args.seed)
            masked = InstanceDataset(subset, train_tf, apply_mask=True)
            accuracy[route] = fit(
                with_extra(aux_model), masked, val_masked, cfg["epochs"], cfg, args
            ).best_value
        pub = PUBLISHED[fraction]
        rows.append(
            {
                "training data": f"{fraction:.0%} ({len(subset)} images)",
                "without extra info": 100 * accuracy["without"],
                "with extra info (labelled aux)": 100 * accuracy["labelled aux"],
                "with extra info (k-means aux)": 100 * accuracy["k-means aux"],
                "without (published)": pub[0],
                "with (published)": pub[1],
            }
        )
        print(f"  {fraction:.0%}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    print_table(rows, list(rows[0]), args.output_dir, "table1", "Table 1: best validation accuracy (%)", 1)
    print(f"\ntotal {time.perf_counter() - start:.0f} s; outputs in {args.output_dir}")


if __name__ == "__main__":
    main()
