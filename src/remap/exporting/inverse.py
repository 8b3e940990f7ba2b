"""A checked plan run backwards: target tensors -> the source's tensors.

The forward plan knows, for every target key, its source keys and its
:class:`~remap.rules.steps.Recipe`; each :class:`~remap.rules.steps.Op` of a recipe carries its
:class:`~remap.rules.steps.Inverse` as data. :func:`invert` walks every recipe from the target
tensor down to the source keys, running each op's inverse:

- transpose, reshape, permute_heads (to the other rotary layout), cast, merge (``cat``/``stack``) and pad invert exactly (a pad is cut
  back off, and the report says how many entries that drops);
- a split's parts are gathered back into one tensor; parts that reach no target key are
  taken from ``like`` (the original source), and the report says which;
- a slice is written back into ``like``'s tensor at the entries it kept;
- ``adapt`` (``in_channels``, ``interpolate``) loses information: ``like``'s tensor is kept,
  or with ``allow_lossy`` an approximate inverse is computed, and the report says which.

A cast back to a narrower dtype gives ``like``'s own tensor wherever the fine-tuned tensor is
exactly what the forward cast made of it, so an export without training is bit-identical.

>>> import torch
>>> from remap.planning.planner import make_plan
>>> from remap.rules.parse import parse_rules
>>> rules = parse_rules({"version": 1, "rules": [{"transpose": "w$"}]})
>>> plan = make_plan(rules, {"w": [2, 3]}, {"w": [3, 2]})
>>> w = torch.arange(6.0).reshape(3, 2)
>>> out = invert(plan, {"w": w}.__getitem__, {})
>>> out["w"].tensor.shape, out["w"].status, out["w"].ops
(torch.Size([2, 3]), 'exported', ('transpose(-2, -1)',))
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from ..meta import dtype_name
from ..rules import ops
from ..rules.steps import Inverse, Recipe, run_recipe

if TYPE_CHECKING:
    from ..planning.planner import Assignment, Plan

__all__ = ["EXPORTED", "APPROXIMATED", "KEPT", "UNCHANGED", "LEFT_OUT", "STATUSES", "Result", "invert", "same_tensor", "lossless_cast"]

EXPORTED = "exported"  # from the target tensors, every op inverted exactly
APPROXIMATED = "lossy_approximated"  # a lossy op on the way, approximately inverted (allow_lossy)
KEPT = "lossy_kept"  # a lossy op on the way: the original tensor kept
UNCHANGED = "unchanged"  # no target key came from it (dropped, unused): the original as it is
LEFT_OUT = "left_out"  # not written (--only-loaded), or a target key no source fed
STATUSES = (EXPORTED, APPROXIMATED, KEPT, UNCHANGED, LEFT_OUT)
_RANK = {EXPORTED: 0, APPROXIMATED: 1, KEPT: 2}

Node = Recipe | str


@dataclass(frozen=True)
class Result:
    """One source tensor computed backwards.

    ``targets`` are the target keys it came from; ``ops`` the forward ops that were
    undone, in the order undone; ``notes`` what the report must say about it (a slice
    written back, a pad cut off, a lossy op). ``exact`` is True when loading the result
    gives back the target tensors bit for bit (the proof checks those).
    """

    tensor: torch.Tensor
    status: str = EXPORTED
    targets: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    exact: bool = True
    part: Inverse | None = None  # a part of a split on its way to the tensor it was cut from: the split's inverse

    def then(self, tensor: torch.Tensor, op: str, *, note: str | None = None, status: str | None = None,
             exact: bool = True, part: Inverse | None = None) -> Result:  # fmt: skip
        """This result carried one op further back."""
        worse = status if status is not None and _RANK[status] > _RANK[self.status] else self.status
        notes = self.notes + ((note,) if note and note not in self.notes else ())
        return Result(tensor, worse, self.targets, (*self.ops, op), notes, self.exact and exact, part)


def combined(tensor: torch.Tensor, results: list[Result], note: str | None = None, exact: bool = True) -> Result:
    """One result from several (the parts of a split): the worst status, every target, op and note."""
    status = max((r.status for r in results), key=_RANK.__getitem__)
    targets = tuple(dict.fromkeys(t for r in results for t in r.targets))
    ops_ = tuple(dict.fromkeys(o for r in results for o in r.ops))
    notes = tuple(dict.fromkeys([*(n for r in results for n in r.notes), *([note] if note else [])]))
    return Result(tensor, status, targets, ops_, notes, exact and all(r.exact for r in results))


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit the same values, NaN where the other has NaN (``torch.equal`` says NaN != NaN).

    >>> same_tensor(torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 1.0]))
    True
    """
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    if not (a.is_floating_point() or a.is_complex()):
        return False
    nan_a, nan_b = a.isnan(), b.isnan()
    return bool(torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b]))


#: Casts that every value survives (a cast back gives the value again): no need to look at --like.
_WIDER = {
    "bool": {"uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64"},
    "uint8": {"int16", "int32", "int64", "float16", "bfloat16", "float32", "float64"},
    "int8": {"int16", "int32", "int64", "float16", "bfloat16", "float32", "float64"},
    "int16": {"int32", "int64", "float32", "float64"},
    "int32": {"int64", "float64"},
    "float16": {"float32", "float64"},
    "bfloat16": {"float32", "float64"},
    "float32": {"float64"},
    "float8_e4m3fn": {"float16", "bfloat16", "float32", "float64"},
    "float8_e5m2": {"float16", "float32", "float64"},
}


def lossless_cast(src: str, dst: str) -> bool:
    """Whether casting ``src`` to ``dst`` keeps every value (so casting back is exact).

    >>> lossless_cast("float16", "float32"), lossless_cast("float32", "bfloat16")
    (True, False)
    """
    return src == dst or dst in _WIDER.get(src, ())


def invert(plan: Plan, target: Callable[[str], torch.Tensor], like: Mapping[str, torch.Tensor], *,
           allow_lossy: bool = False) -> dict[str, Result]:  # fmt: skip
    """Every source key that some target key came from, computed backwards from the target
    tensors (``target(key)``); ``like`` maps source keys to the original tensors, read only
    where an inverse needs them (a slice, a missing split part, a lossy op, a narrowing cast).
    """
    return _Backward(plan, target, like, allow_lossy).run()


def _ident(node: Node) -> Any:
    return node if isinstance(node, str) else id(node)


class _Backward:
    def __init__(self, plan: Plan, target: Callable[[str], torch.Tensor], like: Mapping[str, torch.Tensor], allow_lossy: bool) -> None:
        self.plan, self.target, self.like, self.allow_lossy = plan, target, like, allow_lossy
        self.memo: dict[int, Any] = {}  # forward values of --like's tensors, per recipe node

    def like_value(self, node: Node) -> torch.Tensor:
        """What ``node`` is when the plan runs forward on the original tensors."""
        return run_recipe(node, self.like, self.memo)

    def run(self) -> dict[str, Result]:
        expected: Counter[Any] = Counter()
        seen: set[int] = set()
        roots: list[tuple[Assignment, Node]] = []
        for a in self.plan.assignments:
            node = a.recipe if a.recipe is not None else a.sources[0]
            expected[_ident(node)] += 1
            roots.append((a, node))
            stack = [node]
            while stack:
                n = stack.pop()
                if isinstance(n, str) or id(n) in seen:
                    continue
                seen.add(id(n))
                for i in n.inputs:
                    expected[_ident(i)] += 1
                    stack.append(i)
        pending: dict[Any, list[Result]] = defaultdict(list)
        ready: list[Node] = []

        def deliver(node: Node, result: Result) -> None:
            pending[_ident(node)].append(result)
            if len(pending[_ident(node)]) == expected[_ident(node)]:
                ready.append(node)

        for a, node in roots:
            deliver(node, self.root(a, node))
        leaves: dict[str, Result] = {}
        while ready:
            node = ready.pop()
            result = self.assemble(node, pending.pop(_ident(node)))
            if isinstance(node, str):
                leaves[node] = result
                continue
            for inp, back in zip(node.inputs, self.backward(node, result)):
                deliver(inp, back)
        return leaves

    def root(self, a: Assignment, node: Node) -> Result:
        """The target tensor, in the dtype the plan's ops produce (load_state_dict casts it on
        the way in, so the way out casts it back)."""
        tensor = self.target(a.target).detach().cpu()
        result = Result(tensor, targets=(a.target,))
        have = dtype_name(tensor.dtype)
        if have == a.meta.dtype:
            return result
        back, exact = self.cast_back(tensor, a.meta.dtype, node)
        note = None if exact else f"cast from {have} (the fine-tuned tensor's dtype) to {a.meta.dtype}, which does not hold every value"
        return Result(back, targets=(a.target,), notes=(note,) if note else (), exact=exact)

    def cast_back(self, tensor: torch.Tensor, dtype: str, node: Node) -> tuple[torch.Tensor, bool]:
        """``tensor`` cast back to ``dtype``, and whether casting that forward again gives
        ``tensor`` exactly. Where the forward cast of the original gives ``tensor`` exactly,
        the original's own bits (a cast to a narrower dtype forgets what it rounded)."""
        back = tensor.to(getattr(torch, dtype))
        if not lossless_cast(dtype, dtype_name(tensor.dtype)):
            original = self.like_value(node)
            if same_tensor(original.to(tensor.dtype), tensor):
                return original, True
        return back, same_tensor(back.to(tensor.dtype), tensor)

    def assemble(self, node: Node, results: list[Result]) -> Result:
        """The tensor of ``node`` from what its consumers gave back: one whole tensor, or the
        parts of a split, gathered (the missing ones from the original)."""
        parts = [r for r in results if r.part is not None]
        if not parts:
            (only,) = results  # one consumer, or a root (a planned key is fed once)
            return only
        dim, sizes = parts[0].part["dim"], list(parts[0].part["sizes"])  # type: ignore[index]
        by_part = {r.part["part"]: r for r in parts}  # type: ignore[index]
        missing = [p for p in range(len(sizes)) if p not in by_part]
        pieces = list(self.like_value(node).split(sizes, dim=dim)) if missing else []
        tensor = torch.cat([by_part[p].tensor if p in by_part else pieces[p] for p in range(len(sizes))], dim=dim)
        note = None
        if missing:
            which = ", ".join(str(p + 1) for p in missing)
            many = len(missing) > 1
            note = f"split: part{'s' if many else ''} {which} of {len(sizes)} reach{'' if many else 'es'} no target key: taken from --like"
        return combined(tensor, [by_part[p] for p in sorted(by_part)], note)

    def backward(self, node: Recipe, result: Result) -> list[Result]:
        """What ``node``'s inputs are, given its value ``result``: one result per input."""
        op, inv, t = node.op, node.op.inverse, result.tensor
        if inv is None or (not inv.exact and not (self.allow_lossy and inv.kind in _APPROXIMATE)):
            how = " (allow_lossy, --allow-lossy: an approximate inverse instead)" if inv is not None and inv.kind in _APPROXIMATE else ""
            note = f"{op.describe} cannot be inverted: --like's tensor kept{how}"
            return [result.then(self.like_value(i), op.describe, note=note, status=KEPT, exact=False) for i in node.inputs]
        if not inv.exact:
            tensor, words = _APPROXIMATE[inv.kind](t, inv, node, self)
            return [result.then(tensor, op.describe, note=f"{op.describe}: approximated by {words}", status=APPROXIMATED, exact=False)]
        if inv.kind == "unmerge":
            pieces = t.unbind(inv["dim"]) if inv["stack"] else t.split(list(inv["sizes"]), dim=inv["dim"])
            return [result.then(p, op.describe) for p in pieces]
        if inv.kind == "part":
            return [result.then(t, op.describe, part=inv)]
        if inv.kind == "cast":
            (inp,) = node.inputs
            back, exact = self.cast_back(t, inv["dtype"], inp)
            note = None if exact else f"{op.describe}: cast back to {inv['dtype']}, which does not hold every value of the fine-tuned tensor"
            return [result.then(back, op.describe, note=note, exact=exact)]
        if inv.kind == "scatter":
            (inp,) = node.inputs
            return [result.then(_scatter(t, self.like_value(inp), inv), op.describe, note="slice: written back into --like's tensor")]
        if inv.kind == "crop":
            cropped = t[tuple(slice(0, s) for s in inv["shape"])]
            cut = t.numel() - cropped.numel()
            return [result.then(cropped, op.describe, note=f"pad: the {cut} entries it added are cut back off", exact=False)]
        return [result.then(_EXACT[inv.kind](t, inv), op.describe)]


def _transpose(t: torch.Tensor, inv: Inverse) -> torch.Tensor:
    return ops.transpose(t, inv["dims"])


def _reshape(t: torch.Tensor, inv: Inverse) -> torch.Tensor:
    return t.reshape(tuple(inv["shape"]))


def _permute_heads(t: torch.Tensor, inv: Inverse) -> torch.Tensor:
    return ops.permute_heads(t, heads=inv["heads"], to=inv["to"], dim=inv["dim"])


_EXACT: dict[str, Callable[[torch.Tensor, Inverse], torch.Tensor]] = {"transpose": _transpose, "reshape": _reshape,
                                                                       "permute_heads": _permute_heads}


def _scatter(t: torch.Tensor, base: torch.Tensor, inv: Inverse) -> torch.Tensor:
    """``base`` with ``t`` written back where the slice took it from (for an index listed
    twice, the last entry wins)."""
    out = base.clone()
    d = inv["dim"] % out.dim()
    size = out.shape[d]
    if inv["index"] is not None:
        for j, i in enumerate(inv["index"]):
            out.select(d, i % size).copy_(t.select(d, j))
        return out
    r = range(*slice(inv["start"], inv["stop"], inv["step"]).indices(size))
    forward = r if r.step > 0 else r[::-1]
    where = (slice(None),) * d + (slice(forward.start, forward.stop, forward.step),)
    out[where] = t if r.step > 0 else t.flip(d)
    return out


def _in_channels(t: torch.Tensor, inv: Inverse, node: Recipe, back: _Backward) -> tuple[torch.Tensor, str]:
    """The least-squares inverse of ``adapt in_channels``: a sum over channels spread back
    evenly; repeated RGB filters averaged (and unscaled); summed RGB triples spread back."""
    have, want = inv["channels"], t.shape[1]
    w, rest = t.float(), tuple(t.shape[2:])
    if want == 1:
        out = w.repeat(1, have, *([1] * len(rest))) / have
        words = f"spreading the summed filter evenly over {have} channels"
    elif have == 3:
        out = torch.stack([w[:, c::3].mean(dim=1) for c in range(3)], dim=1) * (want / 3)
        words = f"averaging the repeated RGB filters of {want} channels"
    else:
        out = (w.unsqueeze(2).expand(w.shape[0], want, 3, *rest) / 3).reshape(w.shape[0], have, *rest)
        words = f"spreading each of {want} summed channels over its 3 RGB channels"
    return out.to(t.dtype).contiguous(), words


def _interpolate(t: torch.Tensor, inv: Inverse, node: Recipe, back: _Backward) -> tuple[torch.Tensor, str]:
    out = ops.interpolate_grid(t, target_tokens=inv["tokens"], prefix_tokens=inv["prefix_tokens"], mode=inv["mode"], grid=inv["grid"])
    return out, f"interpolating back to {inv['tokens']} tokens ({inv['mode']})"


def _scatter_repeated(t: torch.Tensor, inv: Inverse, node: Recipe, back: _Backward) -> tuple[torch.Tensor, str]:
    (inp,) = node.inputs
    return _scatter(t, back.like_value(inp), inv), "writing it back into --like's tensor, the last copy of a repeated entry winning"


_APPROXIMATE: dict[str, Callable[..., tuple[torch.Tensor, str]]] = {
    "in_channels": _in_channels,
    "interpolate": _interpolate,
    "scatter": _scatter_repeated,
}


def strip(result: Result) -> Result:
    """The result without its tensor's ties to other tensors (a view of a merged tensor
    becomes its own contiguous tensor), as a file holds it."""
    t = result.tensor
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return result
    return replace(result, tensor=t.clone(memory_format=torch.contiguous_format))
