"""TorchScript archives (``torch.jit.save``) read without running their code.

A TorchScript archive is a zip of ``data.pkl`` (the module tree, pickled: one object per
module, its attributes in its instance dict), ``constants.pkl`` (tensor constants of the
code), ``code/`` (each class's TorchScript source) and the tensors' storages. The pickles
are read with :mod:`remap.sources.pickled_module`'s unpickler, which imports and calls
nothing the file names. Which attributes are parameters and which are buffers is written
in the code, one line per class (``__parameters__ = ["weight", "bias", ]``): those two
lines are read as text (never compiled or run), so the keys are those of
``torch.jit.load(f).state_dict()`` (every parameter, then every buffer, then every
submodule, in attribute order), and each parameter keeps its saved ``requires_grad``.

An archive that cannot be read this way (a torch < 1.4 layout without ``data.pkl``, a
module class the code does not define) is an :class:`~remap.sources.pickled_module.Unsupported`
error naming what was met; ``--trust-pickle`` then reads it with ``torch.jit.load``.

>>> parse_classes("class Linear(Module):\\n  __parameters__ = [\\"weight\\", ]\\n  __buffers__ = []\\n", "__torch__.m")
{'__torch__.m.Linear': ScriptClass(name='__torch__.m.Linear', is_module=True, parameters=('weight',), buffers=())}
"""

from __future__ import annotations

import ast
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SourceError
from .pickled_module import (
    Inert,
    ModuleView,
    Storages,
    StoredReader,
    StoredTensor,
    Unsupported,
    archive_prefix,
    check_tensor,
    entries_of,
    inert_load_record,
    key_entries,
    listed,
    locate,
    open_archive,
    top_entries,
    zip_places,
)
from .readers import _TRUST_HINT

__all__ = ["ScriptClass", "parse_classes", "script_module_view", "open_torchscript", "display_name"]

#: The most code (bytes of ``code/*.py``) read to find the classes' parameters and buffers.
MAX_CODE_BYTES = 256 << 20
_CLASS = re.compile(r"^class ([A-Za-z_]\w*)\(([\w.]*)\):[ \t]*\r?$", re.M)
_DECLARED = re.compile(r"^  (__parameters__|__buffers__) = (\[[^\n]*\])[ \t]*\r?$", re.M)
_MANGLE = re.compile(r"\.___torch_mangle_\d+")


@dataclass(frozen=True)
class ScriptClass:
    """A class of the archive's code: a module or not, and its declared parameters and buffers."""

    name: str
    is_module: bool
    parameters: tuple[str, ...]
    buffers: tuple[str, ...]


def display_name(qualname: str) -> str:
    """The class name as its author wrote it: ``__torch__.vad.___torch_mangle_3.Net`` -> ``vad.Net``."""
    return _MANGLE.sub("", qualname.removeprefix("__torch__."))


def _names(text: str, where: str) -> tuple[str, ...]:
    if len(text) > 1_000_000:
        raise Unsupported(f"{where} is a list of {len(text):,} characters")
    try:
        value = ast.literal_eval(text)  # a literal only: nothing is compiled into code or run
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise Unsupported(f"{where} is not a list of names: {text[:80]!r}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Unsupported(f"{where} is not a list of names: {text[:80]!r}")
    return tuple(value)


def parse_classes(text: str, module: str) -> dict[str, ScriptClass]:
    """The classes one code file defines (``module``: its dotted path, ``__torch__.a.b``)."""
    found = {}
    heads = list(_CLASS.finditer(text))
    for i, head in enumerate(heads):
        block = text[head.end() : heads[i + 1].start() if i + 1 < len(heads) else len(text)]
        name = f"{module}.{head.group(1)}"
        declared = {"__parameters__": (), "__buffers__": ()}
        for line in _DECLARED.finditer(block):
            declared[line.group(1)] = _names(line.group(2), f"{line.group(1)} of class {name}")
        found[name] = ScriptClass(name, head.group(2) == "Module", declared["__parameters__"], declared["__buffers__"])
    return found


def read_classes(z: zipfile.ZipFile, prefix: str) -> dict[str, ScriptClass]:
    """Every class in the archive's ``code/`` folder, by qualified name (``__torch__.torch.nn.modules.linear.Linear``)."""
    folder = f"{prefix}code/"
    infos = [i for i in z.infolist() if i.filename.startswith(folder) and i.filename.endswith(".py")]
    total = sum(i.file_size for i in infos)
    if total > MAX_CODE_BYTES:
        raise Unsupported(f"its code/ folder holds {total:,} bytes of code, more than the {MAX_CODE_BYTES:,} remap reads")
    classes: dict[str, ScriptClass] = {}
    for info in infos:
        module = info.filename[len(folder) : -len(".py")].replace("/", ".")
        classes.update(parse_classes(z.read(info).decode("utf-8", "replace"), module))
    return classes


def script_module_view(classes: dict[str, ScriptClass]) -> Callable[[Any], ModuleView | None]:
    """How :func:`~remap.sources.pickled_module.walk_modules` sees a scripted module: the
    attributes its class declares as parameters and buffers, then its module-typed attributes."""

    def module_class(obj: Any) -> ScriptClass | None:
        if not isinstance(obj, Inert):
            return None
        cls = classes.get(obj.qualname)
        if cls is None:
            attrs = obj.attributes()
            if obj.qualname.startswith("__torch__.") and attrs is not None and "training" in attrs:
                raise Unsupported(f"the module class {obj.qualname} has no definition in the archive's code/, so its "
                                  "parameters cannot be told from its buffers")  # fmt: skip
            return None
        return cls if cls.is_module else None

    def view(obj: Any) -> ModuleView | None:
        cls = module_class(obj)
        if cls is None:
            return None
        attrs = obj.attributes()
        if attrs is None:
            raise SourceError(f"corrupt archive: the module of class {obj.qualname} has no attributes in data.pkl")
        for name in (*cls.parameters, *cls.buffers):
            if name not in attrs:
                raise SourceError(f"corrupt archive: class {obj.qualname} declares {name!r}, which its module in data.pkl lacks")
        own = {*cls.parameters, *cls.buffers}
        names = [n for n in attrs if isinstance(n, str)]
        return ModuleView(
            obj.qualname,
            [(n, attrs[n]) for n in names if n in cls.parameters],
            [(n, attrs[n]) for n in names if n in cls.buffers],
            [(n, attrs[n]) for n in names if n not in own and module_class(attrs[n]) is not None],
        )

    return view


def open_torchscript(path: Path, *, key: str | None, trust_pickle: bool) -> StoredReader | None:
    """The reader of a TorchScript archive, its code never run.

    None when the archive cannot be read this way but ``trust_pickle`` is set (then
    ``torch.jit.load`` reads it); otherwise such an archive is an :class:`Unsupported`
    error saying what was met and how to opt in.
    """
    where = str(path)
    try:
        return _open(path, key)
    except Unsupported as exc:
        if trust_pickle:
            return None
        raise Unsupported(f"is a TorchScript archive that remap cannot read without running it: {exc.message}. Only "
                          f"torch.jit.load reads it, which runs its code: opt in with {_TRUST_HINT} if you trust "
                          "it", where=where) from None  # fmt: skip
    except SourceError as exc:
        raise SourceError(exc.message, where=where) from None
    except OSError as exc:
        raise SourceError(f"cannot read it: {exc.strerror or exc}", where=where) from None


def _open(path: Path, key: str | None) -> StoredReader:
    with open_archive(path) as z:
        prefix = archive_prefix(z)
        names = set(z.namelist())
        if f"{prefix}data.pkl" not in names:
            old = " (a torch<1.4 archive with model.json)" if f"{prefix}model.json" in names else ""
            raise Unsupported(f"it has no {prefix}data.pkl{old}")
        classes = read_classes(z, prefix)
        loaded = inert_load_record(z, f"{prefix}data.pkl", Storages())
        places = zip_places(path, z, f"{prefix}data/")
        constants = _constants(z, path, prefix)
    view_of = script_module_view(classes)
    located = locate(loaded.result, key, view_of)
    if located is None:
        raise Unsupported(f"its data.pkl holds a {type(loaded.result).__name__}, not a scripted module")
    entries, module_classes = entries_of(located, view_of)
    tensors = {e.key: check_tensor(e) for e in entries}
    flags = {e.key: tensors[e.key].requires_grad for e in entries if e.kind == "parameter"}
    shown = list(dict.fromkeys(map(display_name, module_classes)))
    notes = [f"TorchScript archive read without running its code: saved classes: {listed(shown)}"]
    if constants:
        notes.append(f"{constants} tensor constant{'s' if constants > 1 else ''} in constants.pkl (used by its code, "
                     "not part of its state_dict)")  # fmt: skip
    described = {**top_entries(located, view_of), **key_entries(entries, display_name)}
    return StoredReader(path, "torchscript", tensors, places, entries=described, notes=notes, parts=located.parts,
                        detected=located.detected, requires_grad=flags)  # fmt: skip


def _constants(z: zipfile.ZipFile, path: Path, prefix: str) -> int:
    """How many tensor constants ``constants.pkl`` holds, each checked against its record."""
    if f"{prefix}constants.pkl" not in z.namelist():
        return 0
    storages = Storages()
    result = inert_load_record(z, f"{prefix}constants.pkl", storages).result
    places = zip_places(path, z, f"{prefix}constants/")
    for ref in storages.by_key.values():
        place = places.get(ref.key)
        if place is None or ref.nbytes > place.size:
            held = "no record" if place is None else f"a record of {place.size} bytes"
            raise SourceError(f"corrupt archive: constants.pkl names storage {ref.key!r} of {ref.nbytes} bytes; the "
                              f"archive has {held} for it")  # fmt: skip
    values = result if isinstance(result, tuple) else ()
    return sum(isinstance(v, StoredTensor) for v in values)
