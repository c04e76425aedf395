"""Smoke tests of the benchmark scripts (tiny sizes, figures not checked) and of their harness."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = {
    "bench_mil_step": ("mil_step", "ratio"),
    "bench_packed_vs_padded": ("packed_vs_padded", "speedup"),
    "bench_feature_cv": ("feature_cv", "cv_ratio"),
    "bench_memory": ("memory", "grad_difference"),
    "bench_pooling_vs_torchmil": ("pooling_vs_torchmil", "times"),
    "bench_precision": ("precision", "speedup"),
    "bench_export": ("export", "speedups"),
    "classic_mil": ("classic_mil", "results"),
}
# Scripts that need an optional package (an extra of pyproject.toml): skipped without it.
NEEDS = {"bench_export": ("onnxruntime", "the export extra: pip install 'milcell[export]'")}


def _load(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location(f"_milcell_{name}", BENCH_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_runs_and_writes_its_tables(
    script: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    name, key = SCRIPTS[script]
    if script in NEEDS:
        pytest.importorskip(NEEDS[script][0], reason=f"{script} needs {NEEDS[script][1]}")
    results = _load(script, monkeypatch).main(["--smoke", "--out-dir", str(tmp_path)])
    assert key in results
    md = (tmp_path / f"{name}.md").read_text(encoding="utf-8")
    inc = (tmp_path / f"{name}.inc").read_text(encoding="utf-8")
    assert md.startswith("# ") and "Machine: cpu:" in md and "torch:" in md
    assert "--smoke" in md and ".. list-table::" in inc
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.inc", f"{name}.md"]
    out = capsys.readouterr().out
    assert md.splitlines()[0] in out


def test_gradient_difference_is_relative_and_flags_missing_parameters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    module = _load("bench_memory", monkeypatch)
    a = {"w": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5])}
    b = {"w": torch.tensor([1.0, -2.002]), "b": torch.tensor([0.5])}
    diff, count = module._grad_difference(a, b)
    assert count == 2 and diff == pytest.approx(0.001, rel=1e-3)
    assert module._grad_difference(a, {"w": a["w"]})[0] == float("inf")


def test_compare_interleaves_and_reports_every_round(monkeypatch: pytest.MonkeyPatch) -> None:
    harness = _load("_harness", monkeypatch)
    import torch

    calls: list[str] = []
    times = harness.compare(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        repeats=3,
        device=torch.device("cpu"),
        warmup=1,
        inner=2,
    )
    assert calls == ["a", "b", "a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]
    assert [len(v) for v in times.values()] == [3, 3]
    rows = harness.timing_rows({"base": [1.0, 2.0, 3.0], "new": [2.0, 2.0, 9.0]}, "base")
    assert rows[0][-1] == "1.00× (baseline)" and rows[1][-1].startswith("1.00× (rounds 1.00–3.00)")


def test_report_renders_goals_and_escapes_rst(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    harness = _load("_harness", monkeypatch)
    args = harness.parse(harness.make_parser("x"), ["--quick", "--out-dir", str(tmp_path)])
    assert (args.mode, args.repeats, args.device.type) == ("quick", 5, "cpu")
    report = harness.new_report("demo", "Demo title", "N_max *star* `tick`", args, "bench_demo.py")
    report.table("T", ["variant", "median"], [["a|b", "1 ms"]])
    report.goal("fast", "0.90×", True)
    report.goal("faster", "1.20×", False)
    report.write()
    md = (tmp_path / "demo.md").read_text(encoding="utf-8")
    inc = (tmp_path / "demo.inc").read_text(encoding="utf-8")
    assert "measured 0.90× — **met**" in md and "measured 1.20× — **NOT met**" in md
    assert "a\\|b" in md and "`python benchmarks/bench_demo.py --quick`" in md
    assert "N\\_max \\*star\\* \\`tick\\`" in inc and inc.startswith("Demo title\n----------\n")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_parse_rejects_bad_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    harness = _load("_harness", monkeypatch)
    with pytest.raises(SystemExit):
        harness.parse(harness.make_parser("x"), ["--repeats", "0"])
    with pytest.raises(SystemExit):
        harness.parse(harness.make_parser("x"), ["--quick", "--smoke"])
    args = harness.parse(harness.make_parser("x"), ["--smoke"])
    assert (args.repeats, args.warmup) == (1, 0)


@pytest.mark.slow
def test_classic_mil_resume_reuses_same_settings_only_and_reuse_only_computes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = _load("classic_mil", monkeypatch)
    table = module.synthetic_table(tmp_path / "synthetic.csv")
    base = ["--smoke", "--data-dir", str(tmp_path), "--datasets", "synthetic", "--out-dir", str(tmp_path)]
    calls: list[str] = []
    real = module.run_protocol

    def counted(bags: object, pooling: str, **kwargs: object) -> object:
        calls.append(pooling)
        return real(bags, pooling, **kwargs)

    monkeypatch.setattr(module, "run_protocol", counted)
    assert table.is_file()
    first = module.main([*base, "--poolings", "mean", "--resume"])["results"]
    assert calls == ["mean"]
    store = json.loads((tmp_path / "classic_mil_results.json").read_text(encoding="utf-8"))
    assert list(store) == ["synthetic/mean"] and store["synthetic/mean"]["settings"]["inner_fraction"] == 0.2
    again = module.main([*base, "--poolings", "mean,max", "--resume", "--reuse-only"])["results"]
    assert calls == ["mean"]  # nothing computed
    assert list(again) == [("synthetic", "mean")]
    assert again[("synthetic", "mean")]["accuracy"][0] == first[("synthetic", "mean")]["accuracy"][0]
    md = (tmp_path / "classic_mil.md").read_text(encoding="utf-8")
    assert "Not run (--reuse-only" in md and "synthetic/max" in md and "Reused" in md
    module.main([*base, "--poolings", "mean", "--resume", "--inner-fraction", "0.3"])  # other settings
    assert calls == ["mean", "mean"]
    with pytest.raises(SystemExit):
        module.main([*base, "--reuse-only"])
