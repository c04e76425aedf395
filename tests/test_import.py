"""``import milcell`` and ``milcell --help`` stay fast: heavy dependencies load only when needed.

Import state is per process, so the checks that depend on what is (not) loaded run in a fresh
Python subprocess; the consistency of the lazy tables is checked in this process.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import milcell

HEAVY = ("torchvision", "sklearn", "timm", "matplotlib", "onnx", "onnxruntime")
PACKAGES = ("milcell", "milcell.data", "milcell.nn", "milcell.train")
SRC = Path(milcell.__file__).resolve().parent


def _start(code: str, *args: str) -> subprocess.Popen[str]:
    """Start ``code`` in a fresh interpreter."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str]) -> str:
    """Wait for ``proc``; return its stdout (fail with its stderr)."""
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{proc.args!r} did not finish within 300 s")
    assert proc.returncode == 0, err
    return out


def _run(code: str, *args: str) -> str:
    """Run ``code`` in a fresh interpreter; return its stdout (fail with its stderr)."""
    return _finish(_start(code, *args))


def _loaded_code(code: str) -> str:
    """``code``, which calls ``step(name)``, made to print the heavy modules loaded at each step."""
    prelude = f"""
    import json, sys
    HEAVY = {HEAVY!r}
    found = {{}}
    def step(name):
        found[name] = sorted(m for m in HEAVY if m in sys.modules)
    """
    return textwrap.dedent(prelude) + textwrap.dedent(code) + "\nprint(json.dumps(found))\n"


def _found(out: str) -> dict[str, list[str]]:
    return json.loads(out.strip().splitlines()[-1])


def _loaded(code: str) -> dict[str, list[str]]:
    """Run ``code``, which calls ``step(name)``; report the heavy modules loaded after each step."""
    return _found(_run(_loaded_code(code)))


# The checks below that import torch (seconds each) run in fresh interpreters started together
# by the ``fresh`` fixture, so that they overlap; each test then reads its own one's output.

DEFERRED = """
    import numpy as np
    import milcell.data, milcell.train, milcell.metrics
    for pkg in (milcell.data, milcell.train):
        for name in pkg.__all__:
            getattr(pkg, name)
    step("every name of milcell.data and milcell.train")
    s = milcell.data.ClinicalScaler(["age"]).fit(np.array([[20.0], [np.nan], [60.0]]))
    step("ClinicalScaler.fit")
    milcell.data.default_transform()
    step("default_transform()")
    milcell.metrics.binary_report([0, 1], [0.2, 0.7])
    step("binary_report()")
    milcell.data.patient_kfold([0, 1] * 3, n_splits=2)
    milcell.create_pooling("mean", 4)
    step("patient_kfold(), create_pooling()")
    milcell.create_backbone("milcell_mini_resnet_k8")
    step("create_backbone()")
    """

MINI_RESNET_PATHS = [
    "import milcell.nn.mini_resnet",
    "import milcell; milcell.create_backbone('milcell_mini_resnet_k32')",
    "import milcell; milcell.create_mil_model(backbone='milcell_mini_resnet_k8')",
    "import milcell.nn; milcell.nn.MiniResNet",
]

MINI_RESNET = """
    {code}
    import timm
    net = timm.create_model("milcell_mini_resnet_k8", num_classes=0)
    print(type(net).__name__, sorted(timm.list_models("milcell_*")))
    """

PUBLIC_NAME = """
    import inspect
    import milcell.train.noisy_student
    from milcell.train import noisy_student
    import milcell.train
    print(inspect.isfunction(noisy_student), inspect.isfunction(milcell.train.noisy_student))
    """


@pytest.fixture(scope="module")
def fresh(request: pytest.FixtureRequest) -> Iterator[dict[str, subprocess.Popen[str]]]:
    """The slow fresh-interpreter checks the selected tests need, all started at once (killed at the end).

    Keyed by ``"deferred"``, ``"public name"`` and the entries of ``MINI_RESNET_PATHS``.
    """
    codes = {
        "deferred": _loaded_code(DEFERRED),
        "public name": PUBLIC_NAME,
        **{code: MINI_RESNET.format(code=code) for code in MINI_RESNET_PATHS},
    }
    by_test = {
        "test_data_and_train_layers_defer_heavy_dependencies_until_used": "deferred",
        "test_public_name_wins_over_the_submodule_of_the_same_name": "public name",
    }
    wanted = {
        item.callspec.params["code"] if item.originalname not in by_test else by_test[item.originalname]
        for item in request.session.items
        if isinstance(item, pytest.Function) and item.path == Path(__file__) and "fresh" in item.fixturenames
    }
    procs = {key: _start(code) for key, code in codes.items() if key in wanted}
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_import_milcell_loads_no_heavy_dependency() -> None:
    out = _run(f"import milcell, sys; print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert out.strip() == "[]"


def test_cli_help_loads_no_heavy_dependency() -> None:
    found = _loaded(
        """
        import contextlib, io
        from milcell.cli import build_parser, main
        step("import milcell.cli")
        for argv in [["--help"], ["--version"], *([c, "--help"] for c in build_parser()._subcommands)]:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
                main(argv)
            step(" ".join(argv))
        """
    )
    assert "train --help" in found and "demo --help" in found and "info --help" in found
    assert found == {k: [] for k in found}
    help_text = _run("import runpy; runpy.run_module('milcell.cli', run_name='__main__')", "--help")
    assert help_text.startswith("usage: milcell")


def test_data_and_train_layers_defer_heavy_dependencies_until_used(
    fresh: dict[str, subprocess.Popen[str]],
) -> None:
    found = _found(_finish(fresh["deferred"]))
    assert found["every name of milcell.data and milcell.train"] == []
    assert found["ClinicalScaler.fit"] == []
    assert found["default_transform()"] == ["torchvision"]
    assert found["binary_report()"] == ["sklearn", "torchvision"]
    assert found["patient_kfold(), create_pooling()"] == ["sklearn", "torchvision"]
    assert "timm" in found["create_backbone()"]


@pytest.mark.parametrize("code", MINI_RESNET_PATHS)
def test_mini_resnet_is_registered_in_timm_whenever_milcell_could_ask_for_it(
    code: str, fresh: dict[str, subprocess.Popen[str]]
) -> None:
    out = _finish(fresh[code])
    assert out.split(" ", 1) == [
        "MiniResNet",
        "['milcell_mini_resnet', 'milcell_mini_resnet_k32', 'milcell_mini_resnet_k64', "
        "'milcell_mini_resnet_k8']\n",
    ]


def test_public_name_wins_over_the_submodule_of_the_same_name(
    fresh: dict[str, subprocess.Popen[str]],
) -> None:
    # ``milcell.train.noisy_student`` is the function, also when its module is imported first.
    out = _finish(fresh["public name"])
    assert out.split() == ["True", "True"]
    assert inspect.isfunction(milcell.train.noisy_student)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_resolves_and_is_listed(package: str) -> None:
    module = importlib.import_module(package)
    listed = dir(module)
    for name in module.__all__:
        assert getattr(module, name) is not None, name
        assert name in listed, name
    namespace: dict[str, object] = {}
    exec(f"from {package} import *", namespace)
    assert set(module.__all__) <= set(namespace)


@pytest.mark.parametrize("package", PACKAGES)
def test_submodules_are_attributes_and_unknown_names_raise_attribute_error(package: str) -> None:
    module = importlib.import_module(package)
    for sub in module._SUBMODULES:
        value = getattr(module, sub)
        assert inspect.ismodule(value) or sub in module._LAZY_NAMES  # noisy_student: the function
        assert sub in dir(module)
    with pytest.raises(AttributeError, match=rf"module '{package}' has no attribute 'no_such_name'"):
        module.no_such_name  # noqa: B018
    assert not hasattr(module, "no_such_name")


def _type_checking_imports(path: Path) -> dict[str, str]:
    """Name -> module of the ``from X import name`` statements under ``if TYPE_CHECKING:``."""
    found: dict[str, str] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom) and stmt.module is not None
                for alias in stmt.names:
                    found[alias.asname or alias.name] = stmt.module
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_lazy_table_matches_all_and_the_type_checking_imports(package: str) -> None:
    module = importlib.import_module(package)
    path = SRC.joinpath(*package.split(".")[1:], "__init__.py")
    static = _type_checking_imports(path)
    # Names not in the table are bound by the package itself (cheap ones: exceptions, the version).
    assert set(module._LAZY_NAMES) <= set(module.__all__)
    assert {n: m for n, m in static.items() if m != package} == module._LAZY_NAMES
    subs = {n for n, m in static.items() if m == package}
    assert subs == set(module._SUBMODULES) - set(module._LAZY_NAMES)


@pytest.mark.slow
def test_import_benchmark_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))
    spec = importlib.util.spec_from_file_location("_milcell_bench_import", bench_dir / "bench_import.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    results = module.main(["--smoke", "--out-dir", str(tmp_path)])
    assert set(results["ratios"]) == {"import milcell", "milcell --help"}
    assert results["loaded"]["import milcell"] == "none" and results["loaded"]["milcell --help"] == "none"
    assert "timm" in results["loaded"]["milcell.create_mil_model('milcell_mini_resnet_k8')"]
    md = (tmp_path / "import.md").read_text(encoding="utf-8")
    assert "`import milcell` / `import torch` ≤ 1.15" in md and "--smoke" in md
    assert ".. list-table:: Process wall time" in (tmp_path / "import.inc").read_text(encoding="utf-8")
