"""Building a module without memory for its weights: :func:`empty_weights`.

Inside ``with remap.empty_weights():`` every parameter a module registers is put on the
meta device (no memory, no random initialisation), while buffers are made where they
would be anyway, so the ones computed in ``__init__`` (position ids, rotary tables,
attention masks) are correct. ``remap.load`` then assigns the checkpoint's tensors and
initialises what it did not provide with the modules' own ``reset_parameters`` (and a
Hugging Face model's ``_init_weights``).

>>> import torch, remap
>>> with remap.empty_weights():
...     layer = torch.nn.Linear(4, 2)
>>> layer.weight.device.type, layer.weight.requires_grad
('meta', True)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["empty_weights"]

_LOCK = threading.RLock()
_INIT_NAMES = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
               "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")  # fmt: skip


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Parameters registered inside go to the meta device; buffers stay on their real device.

    ``torch.nn.init`` functions return at once for a meta tensor (there is nothing to fill),
    and the call is recorded on it: when no checkpoint provides that tensor, ``remap.load``
    replays the calls on its real memory, so a new head gets the initialisation its
    ``__init__`` gave it (writes not made through ``torch.nn.init`` are not replayed; the
    report says so). Nests, and restores everything on exit, errors included. The patch is process-wide
    while it lasts, as ``torch.device(...)`` is not: build in one thread at a time.

    >>> import torch, remap
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = torch.nn.Linear(8, 8)
    ...         self.register_buffer("ids", torch.arange(8), persistent=False)
    >>> with remap.empty_weights():
    ...     net = Net()
    >>> net.fc.weight.is_meta, net.ids.tolist()[:3]
    (True, [0, 1, 2])
    """
    with _LOCK:
        original = torch.nn.Module.register_parameter
        inits = {n: getattr(torch.nn.init, n) for n in _INIT_NAMES if hasattr(torch.nn.init, n)}
        torch.nn.Module.register_parameter = _meta_register(original)  # type: ignore[method-assign]
        for name, fn in inits.items():
            setattr(torch.nn.init, name, _skip_meta(fn))
        try:
            yield
        finally:
            torch.nn.Module.register_parameter = original  # type: ignore[method-assign]
            for name, fn in inits.items():
                setattr(torch.nn.init, name, fn)


def _meta_register(original: Callable[..., None]) -> Callable[..., None]:
    """``register_parameter`` that moves the registered parameter to meta, keeping its class and requires_grad."""

    def register_parameter(self: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(self, name, param)
        if param is None or param.device.type == "meta":
            return
        cls = type(param)
        extra = dict(getattr(param, "__dict__", {}))  # attributes some libraries hang on parameters
        if cls is not torch.nn.Parameter and not _plain_ctor(cls):
            return  # a parameter subclass with a constructor of its own: left where it is
        moved = cls(param.detach().to("meta"), requires_grad=param.requires_grad)
        moved.__dict__.update(extra)
        if param.numel() <= KEEP_VALUES_UP_TO:  # a value given at construction (CLIP's logit_scale = log(1/0.07)): kept
            moved._remap_inits = [(set_value, (param.detach().clone(),), {})]  # type: ignore[attr-defined]
        moved._remap_version = moved._version  # type: ignore[attr-defined]  # later in-place writes show as a newer version
        self._parameters[name] = moved

    return register_parameter


#: Parameters of at most this many elements keep the value they were registered with, replayed
#: first when no checkpoint provides them: a value set at construction (``nn.Parameter(torch.tensor(2.66))``,
#: ``torch.ones(n)``) is not a ``torch.nn.init`` call, and would otherwise be lost on meta.
#: Larger ones are the weights that empty_weights exists to not initialise.
KEEP_VALUES_UP_TO = 1 << 16


def set_value(tensor: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Write ``value`` into ``tensor`` (what a parameter held when it was registered)."""
    with torch.no_grad():
        return tensor.copy_(value)


def _plain_ctor(cls: type) -> bool:
    """Whether a Parameter subclass keeps Parameter's constructor (data, requires_grad)."""
    return cls.__new__ is torch.nn.Parameter.__new__ and cls.__init__ is torch.nn.Parameter.__init__


def _skip_meta(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (an in-place ``torch.nn.init`` function) that returns a meta tensor untouched,
    recording the call on it (``_remap_inits``) so that :func:`replay` can run the same
    initialisation on the real tensor if no checkpoint provides it."""

    def init(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(tensor, torch.Tensor) and tensor.device.type == "meta":
            try:
                tensor._remap_inits = [*getattr(tensor, "_remap_inits", ()), (fn, args, kwargs)]  # type: ignore[attr-defined]
            except (AttributeError, TypeError):  # a tensor that takes no attributes: nothing to replay
                pass
            return tensor
        return fn(tensor, *args, **kwargs)

    init.__name__, init.__doc__, init.__wrapped__ = fn.__name__, fn.__doc__, fn  # type: ignore[attr-defined]
    return init


def init_owners(module: torch.nn.Module) -> dict[str, Any]:
    """Each submodule's name -> the nearest Hugging Face ``PreTrainedModel`` at or above it
    (whose ``_init_weights(submodule)`` initialises it), or None.

    >>> init_owners(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    {'': None, '0': None}
    """
    owners: dict[str, Any] = {}
    for name, m in module.named_modules():
        parent = name.rpartition(".")[0] if name else None
        owners[name] = m if _is_hf_model(m) else owners.get(parent) if parent is not None else None
    return owners


def _is_hf_model(m: Any) -> bool:
    """A transformers ``PreTrainedModel`` (told by its class tree, without importing transformers)."""
    return callable(getattr(m, "_init_weights", None)) and any(
        c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers") for c in type(m).__mro__)  # fmt: skip


def hf_initialises(owner: Any, m: torch.nn.Module) -> set[str]:
    """The names of ``m``'s own tensors that ``owner._init_weights(m)`` writes, found by running
    it on a twin of ``m`` whose own tensors are fresh meta tensors (``m`` is not touched)."""
    if owner is None:
        return set()
    twin = copy.copy(m)
    twin._parameters = {n: None if p is None else torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                        for n, p in m._parameters.items()}  # fmt: skip
    twin._buffers = {n: None if b is None else torch.empty_like(b, device="meta") for n, b in m._buffers.items()}
    before = {n: (t, t._version) for n, t in [*twin._parameters.items(), *twin._buffers.items()] if t is not None}
    try:
        with torch.no_grad():
            owner._init_weights(twin)
    except Exception:  # an initialiser that cannot run on meta tensors: treated as not computing them
        return set()
    return {n for n, (t, v) in before.items() if getattr(twin, n, None) is not t or t._version != v}


#: What initialised a tensor whose ``__init__`` init calls were replayed: the same values a
#: build on a real device gives, so the report does not call it out.
REPLAYED = "__init__'s values and torch.nn.init calls (replayed)"


def replay(inits: dict[str, list[Any]], m: torch.nn.Module) -> None:
    """Run on ``m``'s real tensors the ``torch.nn.init`` calls its ``__init__`` made on them
    while they were on meta (under :func:`empty_weights`), in their order."""
    for name, calls in inits.items():
        for fn, args, kwargs in calls:
            fn(getattr(m, name), *args, **kwargs)


def initialise(m: torch.nn.Module, owner: Any, fresh: list[str], inits: dict[str, list[Any]] | None = None) -> dict[str, str]:
    """Initialise a module whose tensors ``fresh`` were just materialised: its ``reset_parameters()``
    (unless ``inits`` holds, for every fresh tensor, the init calls its ``__init__`` made under
    :func:`empty_weights`), then those calls replayed, then ``owner._init_weights(m)`` for a
    Hugging Face model; returns name -> what initialised it, for the fresh tensors that were
    written (a name left out stayed as allocated)."""
    inits = {n: c for n, c in (inits or {}).items() if n in fresh and c}
    before = {n: (getattr(m, n), getattr(m, n)._version) for n in fresh}
    done: dict[str, str] = {}
    steps: list[tuple[str, Any]] = []
    if set(inits) != set(fresh):
        steps.append(("reset_parameters", getattr(m, "reset_parameters", None)))
    if inits:
        steps.append((REPLAYED, lambda: replay(inits, m)))
    if owner is not None:
        steps.append((f"{type(owner).__name__}._init_weights", lambda: owner._init_weights(m)))
    with torch.no_grad():
        for label, fn in steps:
            if not callable(fn):
                continue
            fn()
            for n, (t, v) in before.items():
                now = getattr(m, n)
                if now is not t or now._version != v:
                    done[n] = f"{done[n]}, then {label}" if n in done else label
                    before[n] = (now, now._version)
    return done


# --- non-persistent buffers of a module built on meta: computed by building it again ---------------------------------


@dataclasses.dataclass(frozen=True)
class Rebuilt:
    """A non-persistent buffer's value, taken from a twin of the module built again
    under :func:`empty_weights`, and the words that say how (for the report)."""

    value: torch.Tensor
    how: str


def rebuild_buffers(module: torch.nn.Module, wanted: dict[str, torch.Tensor]) -> tuple[dict[str, Rebuilt], list[tuple[list[str], str]]]:
    """Compute ``module``'s non-persistent buffers ``wanted`` (name -> its meta tensor) by building
    again, under :func:`empty_weights` (parameters on meta, so cheap), the outermost module above
    each whose construction is recorded on it: a Hugging Face model from its ``config``
    (``type(model)(config)``, how Hugging Face builds it), a timm model from
    ``timm.create_model(architecture, **model._model_args)``, or a module whose ``__init__`` takes
    exactly ``(config)`` or ``(config, layer_idx)`` and keeps both. A buffer is taken from the twin
    only where the twin's module that holds it has the same class, tensor names and shapes, and
    the buffer the same shape and dtype; else the next module below is tried. ``module`` is not
    touched (the twins are built on cpu, the random state is restored). Returns the values found
    and, for the rest, (names, why not) — an empty ``why`` where nothing above them can be rebuilt.

    >>> class Net(torch.nn.Module):
    ...     def __init__(self, config):
    ...         super().__init__()
    ...         self.config = config
    ...         self.register_buffer("ids", torch.arange(config["n"]), persistent=False)
    >>> with torch.device("meta"):
    ...     net = Net({"n": 3})
    >>> found, missing = rebuild_buffers(net, {"ids": net.ids})
    >>> found["ids"].value.tolist(), found["ids"].how, missing
    ([0, 1, 2], 'Net(config) rebuilt from its dict under remap.empty_weights()', [])
    """
    found: dict[str, Rebuilt] = {}
    reasons: dict[str, list[str]] = {}
    twins: dict[str, tuple[torch.nn.Module | None, str]] = {}
    for name, meta in wanted.items():
        reasons[name] = []
        for root, call in _rebuild_candidates(module, name):
            if root not in twins:
                twins[root] = _build_twin(call)
            twin, how = twins[root]
            if twin is None:
                reasons[name].append(how)
                continue
            rel = name[len(root) + 1:] if root else name
            why = _differs(module.get_submodule(root), twin, rel, meta, how)
            if why is None:
                found[name] = Rebuilt(twin.get_buffer(rel).detach(), f"{how} under remap.empty_weights()")
                break
            reasons[name].append(why)
    missing: dict[str, list[str]] = {}
    for name, why in reasons.items():
        if name not in found:  # the outermost rebuild's reason: the others were built from the same record
            missing.setdefault(why[0] if why else "", []).append(name)
    return found, [(names, why) for why, names in missing.items()]


def _rebuild_candidates(module: torch.nn.Module, name: str) -> Iterator[tuple[str, tuple[Callable[[], torch.nn.Module], str]]]:
    """The modules above buffer ``name`` (outermost first) that can be built again, with the call."""
    parts = name.split(".")[:-1]
    for i in range(len(parts) + 1):
        root = ".".join(parts[:i])
        call = rebuild_call(module.get_submodule(root))
        if call is not None:
            yield root, call


def rebuild_call(m: torch.nn.Module) -> tuple[Callable[[], torch.nn.Module], str] | None:
    """How to build ``m`` again from what is recorded on it, and the words that say so (the call
    and where its arguments come from); None where the call is not certain (a plain module of
    sizes, arguments that are not recorded).

    >>> rebuild_call(torch.nn.Linear(2, 2)) is None
    True
    """
    config = getattr(m, "config", None)
    cls = type(m)
    from_config = f" rebuilt from its {type(config).__name__}"
    if _is_hf_model(m) and config is not None:
        return (lambda: cls(copy.deepcopy(config))), f"{cls.__name__}(config){from_config}"
    timm_args = _timm_args(m)
    if timm_args is not None:
        arch, cfg, args = timm_args
        shown = "".join(f", {k}={v!r}" for k, v in args.items())
        return (lambda: _timm_create(arch, cfg, args)), f"timm.create_model({arch!r}{shown}) rebuilt from the arguments timm recorded"
    required = _required_args(cls)
    if config is None or required is None:
        return None
    if required == ["config"]:
        return (lambda: cls(copy.deepcopy(config))), f"{cls.__name__}(config){from_config}"
    layer = getattr(m, "layer_idx", None)
    if required == ["config", "layer_idx"] and isinstance(layer, int) and not isinstance(layer, bool):
        return (lambda: cls(copy.deepcopy(config), layer_idx=layer)), f"{cls.__name__}(config, layer_idx={layer}){from_config}"
    return None


def _required_args(cls: type) -> list[str] | None:
    """The names of ``cls.__init__``'s arguments without a default, or None where it takes ``*args``/``**kwargs``."""
    try:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    return [p.name for p in params if p.default is p.empty]


def _timm_args(m: torch.nn.Module) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """A timm model's architecture, pretrained_cfg and the arguments ``timm.create_model`` recorded
    on it (``_model_args``, timm 1.0.2x and later); None for anything else."""
    cfg, args = getattr(m, "pretrained_cfg", None), getattr(m, "_model_args", None)
    if not type(m).__module__.startswith("timm.") or not isinstance(cfg, dict) or not isinstance(args, dict):
        return None
    arch = cfg.get("architecture")
    return (arch, cfg, args) if isinstance(arch, str) and arch else None


def _timm_create(arch: str, cfg: dict[str, Any], args: dict[str, Any]) -> torch.nn.Module:
    import timm  # a timm model is being rebuilt: timm is installed

    return timm.create_model(arch, pretrained=False, pretrained_cfg=copy.deepcopy(cfg), **copy.deepcopy(args))


def _build_twin(call: tuple[Callable[[], torch.nn.Module], str]) -> tuple[torch.nn.Module | None, str]:
    """The module ``call`` builds on cpu under :func:`empty_weights`, the random state left as it
    was; (None, why) where the build raised."""
    build, how = call
    try:
        with torch.random.fork_rng(devices=[]), torch.device("cpu"), empty_weights():
            return build(), how
    except Exception as exc:  # a constructor that does not take what was recorded: nothing rebuilt
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return None, f"{how} raised {type(exc).__name__}{': ' + message if message else ''}"


def _differs(root: torch.nn.Module, twin: torch.nn.Module, rel: str, meta: torch.Tensor, how: str) -> str | None:
    """Why buffer ``rel`` of ``twin`` cannot stand for ``root``'s (the class or the tensors of the
    module holding it differ, or the buffer's shape or dtype), or None; worded without the
    buffer's name, so that the layers of a model that differ alike share one message."""
    owner, _, leaf = rel.rpartition(".")
    mine = root.get_submodule(owner)
    try:
        theirs = twin.get_submodule(owner)
    except AttributeError:
        return f"{how} has no {type(mine).__name__} there"
    if type(theirs) is not type(mine):
        return f"{how} has a {type(theirs).__name__} where the module has a {type(mine).__name__}"
    got = theirs._buffers.get(leaf)
    if got is None or got.is_meta:
        return f"{how} does not compute them"
    if got.shape != meta.shape or got.dtype != meta.dtype:
        return f"{how} gives {_shown(got)} where the module has {_shown(meta)}"
    ours, others = _layout(mine), _layout(theirs)
    if ours != others:  # built from other arguments than the module was: its buffers' values cannot be trusted
        diff = [f"{k or 'itself'}: module {_size(ours.get(k))}, rebuilt {_size(others.get(k))}"
                for k in dict.fromkeys([*ours, *others]) if ours.get(k) != others.get(k)]  # fmt: skip
        return f"{how} builds the {type(mine).__name__} that holds them unlike the module's ({'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''})"
    return None


def _layout(m: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Every tensor of ``m`` (parameters and buffers, persistent or not) -> its shape."""
    named = [*m.named_parameters(remove_duplicate=False), *m.named_buffers(remove_duplicate=False)]
    return {n: tuple(t.shape) for n, t in named}


def _size(shape: tuple[int, ...] | None) -> str:
    return "none" if shape is None else str(list(shape))


def _shown(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
