"""Benchmark 8: ONNX Runtime vs PyTorch eager inference of one 198-instance bag on the CPU.

The model is exported with :func:`milcell.export.export_model` (ONNX, one
bag of any size in, class probabilities and attention out) and the file is
run with ONNX Runtime; PyTorch eager runs the same model
(``MILModel.forward`` on the collated bag, under ``torch.inference_mode``,
then the softmax), and also the exported module itself
(:class:`milcell.export.BagPredictor`, eager), which separates the runtime's
speed from ``MILModel.forward``'s own checks and padding. Two settings: a
small image backbone on the bag's images, and the pooling and head alone on
the bag's cached features. Both runtimes
get the same number of CPU threads. The outputs are checked to agree first.

Needs the export extra (``pip install "milcell[export]"``). Run
``python benchmarks/bench_export.py [--quick]``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _harness import (
    TIMING_HEADERS,
    compare,
    fmt_ratio,
    log,
    make_parser,
    median,
    new_report,
    parse,
    pick,
    set_seed,
    timing_rows,
)

from milcell.data.bag import Bag, collate_bags
from milcell.export import BagPredictor, export_model
from milcell.nn.model import MILModel, create_mil_model

BAG = 198  # the largest bag of the lymphocytosis cohort
CLINICAL = 3


def _setting(
    name: str, model: MILModel, instances: torch.Tensor, image_size: int | None, folder: Path, args: Any
) -> dict[str, Any]:
    import onnxruntime as ort

    model = model.eval()
    clinical = torch.tensor([67.0, 12.5, 1.0])
    path = export_model(model, folder / f"{name}.onnx", format="onnx", image_size=image_size)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"instances": instances.numpy(), "clinical": clinical.numpy()}
    batch = collate_bags([Bag(instances, clinical=clinical)])
    predictor = BagPredictor([model])  # the module that was exported, run eagerly
    out: dict[str, Any] = {}

    def eager() -> None:
        with torch.inference_mode():
            out["torch"] = torch.softmax(model(batch).logits.float(), dim=-1)[0].numpy()

    def eager_module() -> None:
        with torch.inference_mode():
            out["module"] = predictor(instances, clinical)[0].numpy()

    def onnx() -> None:
        out["onnx"] = session.run(None, feed)[0]

    eager()
    eager_module()
    onnx()
    diff = max(float(np.abs(out["torch"] - out[k]).max()) for k in ("module", "onnx"))
    log(f"  {name}: outputs agree to {diff:.2g}; timing")
    variants = {"PyTorch eager": eager, "PyTorch eager, exported module": eager_module, "ONNX Runtime": onnx}
    times = compare(variants, args.repeats, args.device, warmup=args.warmup)
    return {"times": times, "diff": diff, "size": path.stat().st_size}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = make_parser(__doc__.splitlines()[0], default_repeats=20)
    args = parse(parser, argv)
    if args.device.type != "cpu":
        parser.error("this benchmark measures CPU inference: use --device cpu")
    gen = set_seed(args.seed)
    backbone = pick(args, "resnet18", "milcell_mini_resnet_k8", "milcell_mini_resnet")
    backbone_kwargs = pick(args, {}, {}, {"width": 4})
    img = pick(args, 224, 64, 32)
    n = pick(args, BAG, BAG, 7)
    dim = pick(args, 512, 512, 16)

    image_model = create_mil_model(
        backbone,
        backbone_kwargs=backbone_kwargs,
        pooling="gated_attention",
        fusion="concat",
        clinical_dim=CLINICAL,
    )
    feature_model = create_mil_model(
        None, in_dim=dim, pooling="gated_attention", fusion="concat", clinical_dim=CLINICAL
    )
    images = torch.randn(n, 3, img, img, generator=gen)
    features = torch.randn(n, dim, generator=gen)
    log(f"bench_export: {backbone} on {n} images of {img}x{img}, and {n} x {dim} features ({args.mode})")
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "images": _setting("images", image_model, images, img, Path(tmp), args),
            "features": _setting("features", feature_model, features, None, Path(tmp), args),
        }
    speedups = {
        k: median(r["times"]["PyTorch eager"]) / median(r["times"]["ONNX Runtime"])
        for k, r in results.items()
    }

    report = new_report(
        "export",
        "ONNX Runtime vs PyTorch eager inference (CPU, one bag)",
        f"Inference of one bag of {n} instances with 3 clinical attributes by a gated-attention MIL model "
        f"with concat fusion, exported to ONNX by milcell.export and run with ONNX Runtime, against "
        f"PyTorch eager (MILModel.forward under inference_mode, then softmax; and the exported module, "
        f"BagPredictor, run eagerly) on the same model: "
        f"(1) images {img}×{img} through {backbone}, (2) cached {dim}-d features (pooling and head "
        f"only). Both use {torch.get_num_threads()} CPU thread(s); interleaved rounds.",
        args,
        __file__,
    )
    import onnxruntime

    report.machine["onnxruntime"] = onnxruntime.__version__
    for key, caption in (
        ("images", f"Images ({backbone}, {img}×{img})"),
        ("features", f"Features ({dim}-d)"),
    ):
        report.table(
            f"{caption}: time per bag", TIMING_HEADERS, timing_rows(results[key]["times"], "PyTorch eager")
        )
    report.table(
        "Speedup of ONNX Runtime (no target: the issue asks for the comparison)",
        [
            "setting",
            "PyTorch eager / ONNX Runtime (medians)",
            "max abs diff of the probabilities",
            "ONNX file",
        ],
        [
            [
                key,
                fmt_ratio(speedups[key]),
                f"{results[key]['diff']:.1e}",
                f"{results[key]['size'] / 1e3:.0f} kB",
            ]
            for key in results
        ],
    )
    report.results = {"speedups": speedups, "results": results}
    report.write()
    return report.results


if __name__ == "__main__":
    main()
