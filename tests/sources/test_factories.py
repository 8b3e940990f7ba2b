"""Importing and calling "module.path:callable" factories."""

from __future__ import annotations

import sys

import pytest
import torch

from remap.errors import TargetError
from remap.sources.factories import build, describe_call, ensure_torchvision, import_callable


def test_ensure_torchvision_is_idempotent() -> None:
    first = ensure_torchvision()
    assert ensure_torchvision() is first is sys.modules["torchvision"]
    assert callable(first.models.resnet18)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("torchvision.models:resnet18", "resnet18"),
        ("torchvision.models.resnet:ResNet", "ResNet"),
        ("collections:OrderedDict.fromkeys", "fromkeys"),
        ("timm.models:resnet18", "resnet18"),
    ],
)
def test_import_callable(spec: str, expected: str) -> None:
    assert import_callable(spec).__name__ == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("torchvision.models.resnet18",
         "expected 'module.path:callable' (e.g. 'torchvision.models:resnet18'), found 'torchvision.models.resnet18'; "
         "did you mean 'torchvision.models:resnet18'?"),
        ("resnet18", "expected 'module.path:callable' (e.g. 'torchvision.models:resnet18'), found 'resnet18'"),
        ("a b:c", "expected 'module.path:callable' (e.g. 'torchvision.models:resnet18'), found 'a b:c'"),
        (3, "expected 'module.path:callable' (e.g. 'torchvision.models:resnet18'), found 3"),
        ("torchvision.models:resnet181",
         "'torchvision.models:resnet181': module 'torchvision.models' has no attribute 'resnet181'; "
         "did you mean 'resnet18', 'resnet101', 'resnet'?"),
        ("torchvision.models:ResNet.forwrd",
         "'torchvision.models:ResNet.forwrd': class 'torchvision.models:ResNet' has no attribute 'forwrd'; did you mean 'forward'?"),
        ("torchvision.models:zzzzzz", "'torchvision.models:zzzzzz': module 'torchvision.models' has no attribute 'zzzzzz'"),
        ("math:pi", "'math:pi' is a float, expected a callable"),
    ],
)  # fmt: skip
def test_import_callable_errors(spec, message: str) -> None:
    with pytest.raises(TargetError) as info:
        import_callable(spec)
    assert (str(info.value), info.value.exit_code) == (f"target.model: {message}", 3)


def test_a_module_that_fails_to_import(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_factory_mod.py").write_text("raise ValueError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TargetError) as info:
        import_callable("broken_factory_mod:f", what="source.model")
    assert str(info.value) == (
        "source.model: 'broken_factory_mod:f': module 'broken_factory_mod' was found, but importing it raised "
        f"ValueError: boom (at {tmp_path / 'broken_factory_mod.py'}:1)"
    )


@pytest.fixture
def bare_folder(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """The working directory is an empty folder that is not on sys.path (as under the `remap` script)."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p and p != str(folder)])
    return folder


def _forget(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    for name in names:
        monkeypatch.delitem(sys.modules, name, raising=False)


def test_a_module_in_the_working_directory_is_found_like_python_m(bare_folder, monkeypatch) -> None:
    _forget(monkeypatch, "cwd_models_a", "cwd_pkg_a", "cwd_pkg_a.nets")
    (bare_folder / "cwd_models_a.py").write_text("import torch\ndef New():\n    return torch.nn.Linear(4, 3)\n")
    (bare_folder / "cwd_pkg_a").mkdir()
    (bare_folder / "cwd_pkg_a" / "__init__.py").write_text("")
    (bare_folder / "cwd_pkg_a" / "nets.py").write_text("from torch.nn import Linear as Net\n")
    before = list(sys.path)
    assert isinstance(build("cwd_models_a:New"), torch.nn.Linear)
    assert import_callable("cwd_pkg_a.nets:Net") is torch.nn.Linear
    assert sys.path == before  # the working directory was importable for the import only


def test_a_module_that_is_nowhere(bare_folder, monkeypatch) -> None:
    _forget(monkeypatch, "no_such_pkg")
    with pytest.raises(TargetError) as info:
        import_callable("no_such_pkg.models:net")
    assert (str(info.value), info.value.exit_code) == (
        "target.model: 'no_such_pkg.models:net': cannot import module 'no_such_pkg.models': no module named "
        f"'no_such_pkg' in the working directory {bare_folder} or on sys.path; run remap from the folder that holds "
        "no_such_pkg.py (or the package folder no_such_pkg/), add that folder to PYTHONPATH, or pip install the "
        "package that provides 'no_such_pkg'",
        3,
    )


def test_a_misspelt_module_in_the_working_directory(bare_folder, monkeypatch) -> None:
    _forget(monkeypatch, "cwd_mymodel")
    (bare_folder / "cwd_mymodels.py").write_text("")
    with pytest.raises(TargetError) as info:
        import_callable("cwd_mymodel:New")
    assert str(info.value) == (
        "target.model: 'cwd_mymodel:New': cannot import module 'cwd_mymodel': no module named 'cwd_mymodel' in the "
        f"working directory {bare_folder} or on sys.path (did you mean 'cwd_mymodels'?); run remap from the folder "
        "that holds cwd_mymodel.py (or the package folder cwd_mymodel/), add that folder to PYTHONPATH, or pip "
        "install the package that provides 'cwd_mymodel'"
    )


def test_a_package_without_the_named_module(bare_folder) -> None:
    with pytest.raises(TargetError) as info:
        import_callable("torch.nn.no_such_mod:net")
    assert str(info.value) == (
        "target.model: 'torch.nn.no_such_mod:net': cannot import module 'torch.nn.no_such_mod': "
        f"package 'torch.nn' ({sys.modules['torch.nn'].__file__}) has no module 'no_such_mod'"
    )


@pytest.mark.parametrize(
    ("text", "error", "line"),
    [
        ("import no_such_dependency_xyz\n", "ModuleNotFoundError: No module named 'no_such_dependency_xyz'", 1),
        ("x = 1\nx = (\n", "SyntaxError: '(' was never closed", 2),
        ("def f():\n    raise KeyError('k')\n\nf()\n", "KeyError: 'k'", 2),
    ],
)
def test_a_module_found_in_the_working_directory_that_raises(bare_folder, monkeypatch, text, error, line) -> None:
    _forget(monkeypatch, "cwd_broken_b")
    (bare_folder / "cwd_broken_b.py").write_text(text)
    with pytest.raises(TargetError) as info:
        import_callable("cwd_broken_b:New")
    assert (str(info.value), info.value.exit_code) == (
        f"target.model: 'cwd_broken_b:New': module 'cwd_broken_b' was found, but importing it raised {error} "
        f"(at {bare_folder / 'cwd_broken_b.py'}:{line})",
        3,
    )


def test_build_calls_with_args_and_kwargs() -> None:
    model = build("torch.nn:Linear", [4, 3], {"bias": False})
    assert isinstance(model, torch.nn.Linear) and model.bias is None
    assert build(torch.nn.Identity)(torch.ones(1)).item() == 1.0  # a callable works too


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ([], {"num_clases": 3},
         "torchvision.models:resnet18(num_clases=3) raised TypeError: ResNet.__init__() got an unexpected keyword argument 'num_clases'"),
        ("abc", None, "args must be a list, found str 'abc'"),
        ([], [1], "kwargs must be a mapping, found list [1]"),
    ],
)  # fmt: skip
def test_build_errors(args, kwargs, message: str) -> None:
    with pytest.raises(TargetError) as info:
        build("torchvision.models:resnet18", args, kwargs)
    assert str(info.value) == f"target.model: {message}"


def test_build_error_keeps_the_cause() -> None:
    with pytest.raises(TargetError) as info:
        build("fractions:Fraction", [1, 0], what="source.model")
    assert str(info.value) == "source.model: fractions:Fraction(1, 0) raised ZeroDivisionError: Fraction(1, 0)"
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_build_on_the_meta_device() -> None:
    model = build("torchvision.models:resnet18", [], {"num_classes": 10}, device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.fc.weight.shape == (10, 512)
    assert torch.ones(1).device.type == "cpu"  # the device context ended


def test_describe_call() -> None:
    assert describe_call("m:f", [1, "a"], {"k": None}) == "m:f(1, 'a', k=None)"


def test_the_torchvision_hook_runs_the_shim_on_the_first_import_by_anyone(tmp_path) -> None:
    """In a fresh interpreter (no conftest): nothing imports torchvision until a library does; then the shim runs."""
    import subprocess

    code = (
        "import sys\n"
        "from remap.sources.factories import import_callable, _TorchvisionHook\n"
        "assert import_callable('torch.nn:Linear') and 'torchvision' not in sys.modules\n"
        "import timm\n"  # timm imports torchvision itself
        "import torchvision\n"
        "print(type(torchvision.__spec__.loader).__name__, torchvision.__spec__.origin == torchvision.__file__,\n"
        "      any(isinstance(f, _TorchvisionHook) for f in sys.meta_path),\n"
        "      timm.create_model('test_resnet', num_classes=3).fc.out_features)\n"
    )
    done = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout.strip()) == (0, "SourceFileLoader True False 3"), done.stderr
