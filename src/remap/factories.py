"""Import and call ``"module.path:callable"`` factories, the way rules name models.

>>> fn = import_callable("collections:OrderedDict")
>>> fn.__name__
'OrderedDict'
>>> build("collections:Counter", ["aab"])["a"]
2

Every failure is a :class:`~remap.errors.TargetError` (exit code 3) that names the spec
and says what was found and what was expected. :func:`ensure_torchvision` makes
``import torchvision`` work on the CPU-only torch that some machines carry next to a
CUDA build of torchvision; :func:`import_callable` runs it before importing any module,
because timm and transformers import torchvision themselves.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

from .errors import TargetError

__all__ = ["import_callable", "build", "ensure_torchvision", "describe_call"]

_SPEC_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_EXAMPLE = "torchvision.models:resnet18"
_TORCHVISION_LIB: Any = None  # keeps the stand-in operator library alive


def ensure_torchvision() -> ModuleType:
    """Import torchvision, working around a CUDA build of it next to a CPU torch.

    Such a build fails with ``RuntimeError: operator torchvision::nms does not exist``
    because its compiled operators are missing. Only then, stand-in schemas for ``nms``
    and ``qnms`` are defined (models never call them) and the import is retried. Safe to
    call any number of times.

    >>> ensure_torchvision().__name__
    'torchvision'
    """
    global _TORCHVISION_LIB
    try:
        import torchvision
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc) or _TORCHVISION_LIB is not None:
            raise
    else:
        return torchvision
    import torch

    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_LIB = lib
    import torchvision

    return torchvision


def _prepare_torchvision() -> None:
    """Run :func:`ensure_torchvision` when torchvision is installed; never fail."""
    if "torchvision" in sys.modules:  # imported already (a failed import leaves no entry)
        return
    try:
        if importlib.util.find_spec("torchvision") is None:
            return
        ensure_torchvision()
    except (ImportError, RuntimeError, OSError):
        return  # the user's own import will fail and report it, if it needs torchvision


def _split_spec(spec: object, what: str) -> tuple[str, str]:
    if not isinstance(spec, str) or not _SPEC_RE.match(spec.strip()):
        hint = ""
        if isinstance(spec, str) and ":" not in spec and "." in spec:
            module, _, attr = spec.strip().rpartition(".")
            hint = f"; did you mean {module + ':' + attr!r}?"
        raise TargetError(
            f"expected 'module.path:callable' (e.g. {_EXAMPLE!r}), found {spec!r}{hint}", where=what
        )
    module, _, attr = spec.strip().partition(":")
    return module, attr


def _import_module(module: str, spec: str, what: str) -> ModuleType:
    _prepare_torchvision()
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TargetError(f"{spec!r}: cannot import module {module!r}: {exc}", where=what) from None
    except Exception as exc:  # a module that raises while importing: report it, not its traceback
        raise TargetError(
            f"{spec!r}: importing module {module!r} raised {type(exc).__name__}: {exc}", where=what
        ) from None


def _close_matches(name: str, obj: object) -> str:
    names = [n for n in dir(obj) if not n.startswith("_")]
    matches = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""


def import_callable(spec: str, *, what: str = "target.model") -> Callable[..., Any]:
    """Import ``"package.module:attr.sub"`` and return the callable it names.

    ``what`` names the rules field for error messages.

    >>> import_callable("math:sqrt")(16.0)
    4.0
    """
    module_name, attr = _split_spec(spec, what)
    obj: Any = _import_module(module_name, spec, what)
    owner = module_name
    for part in attr.split("."):
        if not hasattr(obj, part):
            kind = "module" if isinstance(obj, ModuleType) else "class" if isinstance(obj, type) else type(obj).__name__
            raise TargetError(
                f"{spec!r}: {kind} {owner!r} has no attribute {part!r}{_close_matches(part, obj)}",
                where=what,
            )
        obj = getattr(obj, part)
        owner = f"{owner}{'.' if ':' in owner else ':'}{part}"
    if not callable(obj):
        raise TargetError(f"{spec!r} is a {type(obj).__name__}, expected a callable", where=what)
    return obj


def describe_call(spec: object, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> str:
    """``"torchvision.models:resnet18(num_classes=10)"``: a call as messages show it."""
    name = spec if isinstance(spec, str) else getattr(spec, "__qualname__", repr(spec))
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in (kwargs or {}).items()]
    return f"{name}({', '.join(parts)})"


def build(
    spec: str | Callable[..., Any],
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    what: str = "target.model",
    device: str | None = None,
) -> Any:
    """Import the factory ``spec`` (or take a callable) and call it with ``args``/``kwargs``.

    With ``device`` (e.g. ``"meta"``) the call runs under ``with torch.device(device):``;
    the import happens before, so module-level tensors are made as usual.

    >>> build("fractions:Fraction", [3, 6])
    Fraction(1, 2)
    """
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
        raise TargetError(f"args must be a list, found {type(args).__name__} {args!r}", where=what)
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TargetError(f"kwargs must be a mapping, found {type(kwargs).__name__} {kwargs!r}", where=what)
    fn = spec if callable(spec) else import_callable(spec, what=what)
    try:
        if device is None:
            return fn(*args, **dict(kwargs or {}))
        import torch

        with torch.device(device):
            return fn(*args, **dict(kwargs or {}))
    except Exception as exc:  # the factory's own failure, reported without its traceback
        raise TargetError(
            f"{describe_call(spec, args, kwargs)} raised {type(exc).__name__}: {exc}", where=what
        ) from exc
