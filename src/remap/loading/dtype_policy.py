"""The dtype every loaded tensor ends in, what changed precision, and the range check of narrowing casts.

``target.dtype`` (or ``remap.load(..., dtype=)``) and ``target.keep_fp32`` decide, per key:

* a key matching a ``keep_fp32`` pattern ends in float32, whatever ``dtype`` says (norms,
  MoE routers, anything whose precision matters more than its size);
* ``dtype: auto`` keeps the dtype the checkpoint (after the rules' steps) gives the key;
* a dtype name casts to it;
* no ``dtype``: the target's own dtype.

Only floating tensors are cast (integer and bool tensors take the target's dtype, as
``load_state_dict`` gives them). Where the target's tensors are made by the load (a meta-device
target, and every target remap builds itself), that is the dtype the parameter gets. A target
whose tensors exist already keeps their dtypes: ``load_state_dict`` copies into them, casting
(a checkpoint's bf16 into a float32 parameter is an upcast by that copy); ``dtype: auto`` cannot
apply there and is refused, and a ``keep_fp32`` key held in another dtype is refused too.

Every key whose tensor changes dtype on the way from the checkpoint to the module is reported
(:func:`precision_changes`, grouped: ``142 keys bfloat16 -> float32``), whether a rules step
(``cast``, ``dequant_blocks``) or the load did it. A cast done by the load whose target dtype
holds a smaller range than the value's (float32 -> float16, bfloat16 -> float16, float32 ->
bfloat16) is checked at apply time, on each tensor before it is written: a finite value that
would become infinite fails the load with the key, the largest value and the dtype's largest,
and the module is put back as it was (:class:`RangeFailure`).

>>> policy = DtypePolicy.of("bfloat16", keep_fp32=[r"norm\\.weight$"])
>>> policy.final("ln.norm.weight", "float32", "float16"), policy.final("fc.weight", "float32", "float16")
('float32', 'bfloat16')
>>> DtypePolicy.of("auto").final("fc.weight", "float32", "float16")
'float16'
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import UsageError
from ..meta import dtype_name
from ..report.records import Failure, PrecisionRecord

if TYPE_CHECKING:
    from ..planning.planner import Plan

__all__ = ["AUTO", "DtypePolicy", "RangeFailure", "precision_changes", "narrowing", "check_range", "cast_module", "FLOAT_MAX"]

AUTO = "auto"
#: The largest finite value of each floating dtype.
FLOAT_MAX = {"float64": 1.7976931348623157e308, "float32": 3.4028234663852886e38, "bfloat16": 3.3895313892515355e38,
             "float16": 65504.0, "float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}  # fmt: skip
#: Casts that keep every value (so nothing is lost; no check).
WIDENING = {
    "float16": {"float32", "float64"},
    "bfloat16": {"float32", "float64"},
    "float32": {"float64"},
    "float8_e4m3fn": {"float16", "bfloat16", "float32", "float64"},
    "float8_e5m2": {"float16", "float32", "float64"},
}
#: Why a key ends in its dtype: the rules' steps made it so, ``keep_fp32``, the dtype asked
#: for (``target.dtype`` / ``dtype=``), or the target's own tensor.
BY_STEPS, BY_KEEP_FP32, BY_DTYPE, BY_TARGET = "steps", "keep_fp32", "dtype", "target"


def _floating(name: str) -> bool:
    return name in FLOAT_MAX


@dataclass(frozen=True)
class DtypePolicy:
    """``dtype`` (None, ``"auto"`` or a dtype name) and the ``keep_fp32`` patterns."""

    dtype: str | None = None
    keep_fp32: tuple[str, ...] = ()

    @classmethod
    def of(cls, dtype: str | torch.dtype | None, keep_fp32: Iterable[str] = ()) -> DtypePolicy:
        """From what the caller gave: a torch dtype, its name, ``"auto"`` or None."""
        name = None if dtype is None else AUTO if dtype == AUTO else dtype_name(dtype)
        return cls(name, tuple(keep_fp32))

    @property
    def active(self) -> bool:
        return self.dtype is not None or bool(self.keep_fp32)

    def kept_fp32(self, key: str) -> bool:
        from ..rules.patterns import compile_regex, search

        return any(search(compile_regex(p), key) is not None for p in self.keep_fp32)

    def final(self, key: str, target_dtype: str, value_dtype: str) -> str:
        """The dtype ``key`` ends in when the load makes its tensor (a meta-device target)."""
        return self.decide(key, target_dtype, value_dtype)[0]

    def decide(self, key: str, target_dtype: str, value_dtype: str) -> tuple[str, str]:
        """``(dtype, why)`` for a tensor the load makes; ``why`` is one of the ``BY_*`` words."""
        if not (_floating(value_dtype) and _floating(target_dtype)):
            return target_dtype, BY_TARGET
        if self.keep_fp32 and self.kept_fp32(key):
            return "float32", BY_KEEP_FP32
        if self.dtype == AUTO:
            return value_dtype, BY_STEPS
        if self.dtype is not None:
            return self.dtype, BY_DTYPE
        return target_dtype, BY_TARGET

    def want(self, key: str, target_dtype: str, value_dtype: str) -> torch.dtype:
        """:meth:`final` as a torch dtype (for the streaming code)."""
        return getattr(torch, self.final(key, target_dtype, value_dtype))


class RangeFailure(Exception):
    """A narrowing cast met a value the target dtype cannot hold: ``failure`` names the key."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def narrowing(src: str, dst: str) -> bool:
    """Whether casting ``src`` to ``dst`` may turn a finite value infinite (a smaller range).

    >>> narrowing("float32", "float16"), narrowing("bfloat16", "float16"), narrowing("float16", "float32")
    (True, True, False)
    """
    return _floating(src) and _floating(dst) and FLOAT_MAX[dst] < FLOAT_MAX[src]


def check_range(key: str, value: torch.Tensor, dtype: torch.dtype, sources: tuple[str, ...] = ()) -> None:
    """Raise :class:`RangeFailure` when casting ``value`` to ``dtype`` turns a finite value infinite.

    >>> check_range("w", torch.tensor([1.0, 7e4]), torch.float16)
    Traceback (most recent call last):
    ...
    remap.loading.dtype_policy.RangeFailure: 'w': float32 -> float16 overflows: its largest value is 70000 (at index 1), and float16 holds at most 65504; ...
    """
    if value.device.type == "meta" or not value.numel():
        return
    cast = value.to(dtype)
    if not bool(torch.isinf(cast).any()):
        return
    bad = torch.isinf(cast) & torch.isfinite(value)
    if not bool(bad.any()):
        return  # infinities in the checkpoint itself stay what they were
    where = int(torch.nonzero(bad.reshape(-1))[0])
    largest = float(value[bad].abs().max())
    src, dst = dtype_name(value.dtype), dtype_name(dtype)
    raise RangeFailure(Failure("precision", f"{key!r}: {src} -> {dst} overflows: its largest value is {largest:g} "
                                            f"(at index {where}), and {dst} holds at most {FLOAT_MAX[dst]:g}; "
                                            f"{int(bad.sum())} value(s) would become inf. Load it in a wider dtype "
                                            f"(target.keep_fp32, or another target.dtype), or scale it in the rules",
                               tuple(dict.fromkeys((key, *sources)))))  # fmt: skip


def precision_changes(plan: Plan, policy: DtypePolicy, state: Mapping[str, Any] | None, on_meta: bool
                      ) -> tuple[tuple[PrecisionRecord, ...], dict[str, str]]:  # fmt: skip
    """Every loaded key whose dtype in the module differs from its checkpoint dtype, grouped by
    (checkpoint dtype, final dtype, why); and the keys whose cast at load time narrows the
    range (target key -> final dtype), which :func:`check_range` checks as they stream in.

    ``state`` is the module's ``state_dict(keep_vars=True)`` (an allocated target keeps its
    tensors' dtypes); ``on_meta``: the load makes the tensors. UsageError before anything is
    read when the policy cannot apply to an allocated target.
    """
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    checks: dict[str, str] = {}
    refused: list[str] = []
    for a in plan.assignments:
        meta = plan.target_meta[a.target]
        value = a.meta.dtype  # what the rules' steps give
        stored = plan.source_meta[a.sources[0]].dtype if a.sources and a.sources[0] in plan.source_meta else value
        if on_meta:
            final, why = policy.decide(a.target, meta.dtype, value)
        else:
            held = state.get(a.target) if state is not None else None
            final, why = (dtype_name(held.dtype) if isinstance(held, torch.Tensor) else meta.dtype), BY_TARGET
            wanted, by = policy.decide(a.target, final, value)
            if by == BY_KEEP_FP32 and wanted != final:
                refused.append(f"{a.target} ({final})")
        if final == value and value != stored:
            why = BY_STEPS
        if final != stored:
            kind = _kind(stored, final)
            if final != value and _kind(value, final) == "narrowed":  # the load's own cast loses what the steps made
                kind = "narrowed"
            groups.setdefault((stored, final, kind, why), []).append(a.target)
        if final != value and narrowing(value, final):
            checks[a.target] = final
    if policy.dtype == AUTO and not on_meta and plan.assignments:
        raise UsageError("dtype auto keeps the checkpoint's dtypes, so the load must make the target's tensors: this module "
                         "already has its memory. Build it on the meta device (`with torch.device('meta'):` or "
                         "`remap.empty_weights()`, or let remap build target.model), or name a dtype")  # fmt: skip
    if refused:
        shown = ", ".join(refused[:5]) + (f" and {len(refused) - 5} more" if len(refused) > 5 else "")
        raise UsageError(f"target.keep_fp32 matches tensors this module already holds in another dtype: {shown}. A module "
                         "with its memory keeps its dtypes; make those float32 before loading, or build the target on "
                         "the meta device (or let remap build target.model)")  # fmt: skip
    records = tuple(PrecisionRecord(src, dst, kind, by, tuple(keys)) for (src, dst, kind, by), keys in groups.items())
    return records, checks


def _kind(src: str, dst: str) -> str:
    """``widened`` (every value kept), ``narrowed`` (a float cast that loses precision or
    range) or ``converted`` (to or from a non-floating dtype)."""
    if dst in WIDENING.get(src, ()):
        return "widened"
    return "narrowed" if _floating(src) and _floating(dst) else "converted"


def cast_module(module: torch.nn.Module, dtype: str | None, keep_fp32: Iterable[str] = ()) -> torch.nn.Module:
    """A target remap builds, in the dtypes the policy gives: floating tensors to ``dtype``,
    those matching ``keep_fp32`` to float32 (``auto`` and None leave the dtypes alone, as the
    load gives them). Works on meta tensors (no memory) as on real ones."""
    policy = DtypePolicy.of(dtype, keep_fp32)
    if policy.dtype not in (None, AUTO):
        module = module.to(getattr(torch, policy.dtype))
    if policy.keep_fp32:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and tensor.dtype != torch.float32 and policy.kept_fp32(name):
                tensor.data = tensor.data.to(torch.float32)
    return module
