"""Import and call ``"module.path:callable"`` factories, the way rules name models.

>>> fn = import_callable("collections:OrderedDict")
>>> fn.__name__
'OrderedDict'
>>> build("collections:Counter", ["aab"])["a"]
2

Every failure is a :class:`~remap.errors.TargetError` (exit code 3) that names the spec
and says what was found and what was expected. :func:`ensure_torchvision` makes
``import torchvision`` work on the CPU-only torch that some machines carry next to a
CUDA build of torchvision. :func:`import_callable` installs a hook that runs it the first
time anything imports torchvision (timm and transformers import it themselves), so a
factory that never needs torchvision never pays for importing it.

Modules are found the way ``python -m`` finds them: the working directory is searched
first, so ``mymodels:Net`` works from the folder that holds ``mymodels.py``.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.abc
import importlib.util
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any

from ..errors import TargetError

__all__ = ["import_callable", "build", "ensure_torchvision", "install_torchvision_hook", "describe_call"]

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


class _Present(importlib.abc.Loader):
    """Hands the import system a module that is already imported, and restores its spec."""

    def __init__(self, module: ModuleType, spec: Any) -> None:
        self.module, self.spec = module, spec

    def create_module(self, spec: Any) -> ModuleType:
        return self.module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self.spec  # the import system set it to the stand-in spec


class _TorchvisionHook(importlib.abc.MetaPathFinder):
    """Runs :func:`ensure_torchvision` the first time anything imports torchvision.

    Importing torchvision costs about a second, so it happens only when a factory (or a
    library a factory imports, such as timm or transformers) asks for it; the shim then
    runs before that import, wherever it comes from.
    """

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "torchvision" or "torchvision" in sys.modules:
            return None
        _remove_torchvision_hook()
        try:
            module = ensure_torchvision()
        except Exception:  # noqa: BLE001 - the import system retries and raises torchvision's own error
            return None
        # The import system would execute a fresh copy under the module's own spec: hand it this one
        spec = importlib.util.spec_from_loader(name, _Present(module, module.__spec__))
        module.__spec__ = spec
        return spec


def _remove_torchvision_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TorchvisionHook)]


def install_torchvision_hook() -> None:
    """Make the next ``import torchvision``, by anyone, go through :func:`ensure_torchvision`.

    Costs nothing until torchvision is imported; a no-op once it has been (or while the
    hook is already installed).
    """
    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionHook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionHook())


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


@contextlib.contextmanager
def _working_directory_importable() -> Iterator[str]:
    """The working directory on ``sys.path`` for one import, as ``python -m`` puts it there.

    Yields the directory; removes it again afterwards unless it was there before.
    """
    cwd = os.getcwd()
    present = any(os.path.abspath(p or os.curdir) == cwd for p in sys.path if isinstance(p, str))
    if present:
        yield cwd
        return
    sys.path.insert(0, cwd)
    try:
        yield cwd
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(cwd)


def _not_found(module: str, missing: str, cwd: str) -> str:
    """What was searched for a module that does not exist, and how to make it importable."""
    parent, _, child = missing.rpartition(".")
    if parent in sys.modules:  # the package exists, a module in it does not
        found_at = getattr(sys.modules[parent], "__file__", None)
        return f"package {parent!r}{f' ({found_at})' if found_at else ''} has no module {child!r}"
    top = missing.split(".")[0]
    return (
        f"no module named {missing!r} in the working directory {cwd} or on sys.path{_nearby(top, cwd)}; run remap "
        f"from the folder that holds {top}.py (or the package folder {top}/), add that folder to PYTHONPATH, or pip "
        f"install the package that provides {top!r}"
    )


def _nearby(name: str, folder: str) -> str:
    """``" (did you mean 'mymodels'?)"`` from the modules in ``folder`` that are spelt like ``name``."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return ""
    names = {e.removesuffix(".py") for e in entries if e.endswith(".py") or os.path.isfile(os.path.join(folder, e, "__init__.py"))}
    matches = difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.7)
    return f" (did you mean {', '.join(repr(m) for m in matches)}?)" if matches else ""


def _where_raised(exc: BaseException) -> str:
    """``"/path/mymodels.py:12"``: the innermost frame of a traceback that is not the import system's."""
    if isinstance(exc, SyntaxError) and exc.filename:  # raised by the compiler: the traceback ends before the file
        return f"{exc.filename}:{exc.lineno}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen ")]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "unknown location"


def _import_module(module: str, spec: str, what: str) -> ModuleType:
    """Import ``module`` with the working directory importable; TargetError saying why not."""
    install_torchvision_hook()
    with _working_directory_importable() as cwd:
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as exc:
            parts = module.split(".")
            if exc.name in {".".join(parts[: i + 1]) for i in range(len(parts))}:
                message = f"{spec!r}: cannot import module {module!r}: {_not_found(module, exc.name, cwd)}"
                raise TargetError(message, where=what) from None
            error = exc
        except Exception as exc:  # noqa: BLE001 - a module that raises while importing: report it, not its traceback
            error = exc
    detail = error.msg if isinstance(error, SyntaxError) else _first_line(error)
    raise TargetError(
        f"{spec!r}: module {module!r} was found, but importing it raised {type(error).__name__}: {detail} "
        f"(at {_where_raised(error)})",
        where=what,
    ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else "(no message)"


def _close_matches(name: str, obj: object) -> str:
    names = [n for n in dir(obj) if not n.startswith("_")]
    matches = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""


def import_callable(spec: str, *, what: str = "target.model") -> Callable[..., Any]:
    """Import ``"package.module:attr.sub"`` and return the callable it names.

    The module is searched for as ``python -m`` searches: in the working directory first,
    then on ``sys.path``. ``what`` names the rules field for error messages.

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
