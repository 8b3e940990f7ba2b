"""Importing and calling "module.path:callable" factories."""

from __future__ import annotations

import sys

import pytest
import torch

from remap.errors import TargetError
from remap.factories import build, describe_call, ensure_torchvision, import_callable


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
        ("no_such_pkg.models:net", "'no_such_pkg.models:net': cannot import module 'no_such_pkg.models': No module named 'no_such_pkg'"),
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
    assert str(info.value) == "source.model: 'broken_factory_mod:f': importing module 'broken_factory_mod' raised ValueError: boom"


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
