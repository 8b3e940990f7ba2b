"""Where two models part: pair source and target modules through the plan, run both with
forward hooks, and name the first pair whose outputs differ.

**Pairing rule.** A target module T and a source module S correspond when their subtrees
hold the same weights, seen through the plan:

1. every tensor under T (``recurse=True``: its own and its descendants') is loaded (a
   missing or mismatched key there: T computes something else, no partner; tied aliases
   are left out, their first name carries them);
2. the source keys that fed T's tensors feed nothing outside T (a ``split`` of one source
   tensor into ``q_proj``, ``k_proj`` and ``v_proj`` leaves each part's module without a
   partner: its output is a third of what the source module gives);
3. S's subtree holds exactly those source keys among the used ones (a source key belongs to
   the module ``key.rpartition(".")[0]``, and to every module above it).

So a leaf pairs with a leaf (``mlp.0`` <- ``mlp.fc1``); a fused ``qkv`` made by a ``merge``
of ``q``, ``k`` and ``v`` in three source modules pairs with nothing, but the attention
module holding it pairs with the source attention module holding the three (their outputs
correspond; the fused projection's does not); blocks pair with blocks and stacks with
stacks. When several nested modules on one side hold the same weights (``heads`` holding
only ``heads.head``), the chains pair from the inside out, and what is left over on the
longer side pairs with the other side's outermost module. Parameter-free modules
(activations, dropout) pair with nothing and are not listed. The rule is conservative
but not proof against a forward that computes something different from the same weights
(a permute inside one side's module): such a pair is compared only when its outputs have
the same structure and shapes, and is skipped (with the reason) otherwise.

**Order.** Outputs are compared call by call (a module called three times is compared three
times, in order) in the order the target's calls *finish*: a module finishes after every
module it calls, so the first pair that differs is the innermost one whose inputs, as far
as any paired module saw them, still agreed: the bug site, not the block around it.

>>> import torch
>>> from remap.report.records import TargetRecord
>>> src, tgt = torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.nn.Sequential(torch.nn.Linear(2, 2))
>>> tgt.load_state_dict(src.state_dict())
<All keys matched successfully>
>>> records = [TargetRecord(k, "loaded", (), "float32", "parameter", 0, sources=(k,)) for k in ("0.weight", "0.bias")]
>>> d = first_divergence(src, tgt, ([torch.ones(1, 2)], {}), records, atol=1e-6, rtol=0.0)
>>> d["first"], d["compared"], d["pairs"]
(None, 2, [['0', '0'], ['', '']])
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from ..report.records import LOADED, TIED
from .compare import compare, tensor_leaves

__all__ = ["first_divergence", "describe_divergence", "pair_modules", "ModulePairing"]


@dataclass
class ModulePairing:
    """Which target module pairs with which source module, and which found no partner.

    ``pairs`` are (target, source) names in the target's module order; ``keys`` and
    ``sources`` hold, per paired target module, its loaded target keys and the source keys
    that fed them; ``ops`` the ops those keys went through (each once, in record order).
    """

    pairs: list[tuple[str, str]] = field(default_factory=list)
    unpaired_target: list[str] = field(default_factory=list)
    unpaired_source: list[str] = field(default_factory=list)
    keys: dict[str, list[str]] = field(default_factory=dict)
    sources: dict[str, list[str]] = field(default_factory=dict)
    ops: dict[str, list[str]] = field(default_factory=dict)


def _field(record: Any, name: str) -> Any:
    """A record's field: a TargetRecord's attribute or a report dict's entry."""
    return record[name] if isinstance(record, Mapping) else getattr(record, name)


def _ancestors(module: str) -> Iterator[str]:
    """``a.b.c`` -> ``a.b.c``, ``a.b``, ``a``, ``""`` (the model itself).

    >>> list(_ancestors("a.b"))
    ['a.b', 'a', '']
    """
    while module:
        yield module
        module = module.rpartition(".")[0]
    yield ""


def _owner(key: str) -> str:
    return key.rpartition(".")[0]


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


@dataclass
class _Subtree:
    """What a target module's subtree holds, key by key."""

    loaded: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)
    tied: bool = False
    blocked: bool = False  # a key under it is not loaded (missing, mismatched) or not placed


def pair_modules(source_model: Any, target_model: Any, records: Iterable[Any]) -> ModulePairing:
    """Pair target and source modules through the plan's records (the module docstring's rule).

    >>> import torch
    >>> from remap.report.records import TargetRecord
    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> recs = [TargetRecord(k, "loaded", (), "float32", "parameter", 0, sources=(k,)) for k in ("0.weight", "0.bias")]
    >>> pair_modules(m, m, recs).pairs
    [('', ''), ('0', '0')]
    """
    t_names = [n for n, _ in target_model.named_modules()]
    s_names = [n for n, _ in source_model.named_modules()]
    subtrees, feeds = _target_subtrees(records, set(t_names))
    used: dict[str, set[str]] = {}
    unplaced: set[str] = set()
    s_known = set(s_names)
    for key in feeds:
        if _owner(key) not in s_known:
            unplaced.add(key)  # a source key no module of the source model holds
            continue
        for module in _ancestors(_owner(key)):
            used.setdefault(module, set()).add(key)
    by_sources: dict[frozenset[str], list[str]] = {}
    for name in t_names:
        sub = subtrees.get(name)
        if sub is None or not sub.loaded or sub.blocked or unplaced.intersection(sub.sources):
            continue
        fed = set().union(*(feeds[s] for s in sub.sources))
        if fed == set(sub.loaded):  # what fed it feeds nothing else
            by_sources.setdefault(frozenset(sub.sources), []).append(name)
    s_chains: dict[frozenset[str], list[str]] = {}
    for name in s_names:
        if name in used:
            s_chains.setdefault(frozenset(used[name]), []).append(name)
    result = ModulePairing()
    for keyset, t_chain in by_sources.items():
        s_chain = s_chains.get(keyset)
        if s_chain:
            result.pairs.extend(_pair_chains(t_chain, s_chain))
    t_order, s_order = {n: i for i, n in enumerate(t_names)}, {n: i for i, n in enumerate(s_names)}
    result.pairs = sorted(set(result.pairs), key=lambda p: (t_order[p[0]], s_order[p[1]]))
    paired_t, paired_s = {t for t, _ in result.pairs}, {s for _, s in result.pairs}
    result.unpaired_target = [n for n in t_names if n in subtrees and n not in paired_t]
    result.unpaired_source = [n for n in s_names if n in used and n not in paired_s]
    for name in paired_t:
        sub = subtrees[name]
        result.keys[name], result.sources[name], result.ops[name] = sub.loaded, sub.sources, sub.ops
    return result


def _target_subtrees(records: Iterable[Any], modules: set[str]) -> tuple[dict[str, _Subtree], dict[str, set[str]]]:
    """Per target module, what its subtree holds; per used source key, the target keys it fed."""
    subtrees: dict[str, _Subtree] = {}
    feeds: dict[str, set[str]] = {}
    for record in records:
        key, status = _field(record, "key"), _field(record, "status")
        owner = _owner(key)
        chain = list(_ancestors(owner))
        if owner not in modules:  # a key of a module the target does not name (shared under a second name)
            chain = [m for m in chain if m in modules]
            for module in chain:
                subtrees.setdefault(module, _Subtree()).blocked = True
            continue
        for module in chain:
            sub = subtrees.setdefault(module, _Subtree())
            if status == LOADED:
                sub.loaded.append(key)
                sub.sources.extend(s for s in _field(record, "sources") if s not in sub.sources)
                sub.ops.extend(o for o in _field(record, "ops") if o not in sub.ops)
            elif status == TIED:
                sub.tied = True
            else:
                sub.blocked = True
        if status == LOADED:
            for source in _field(record, "sources"):
                feeds.setdefault(source, set()).add(key)
    return subtrees, feeds


def _pair_chains(t_chain: Sequence[str], s_chain: Sequence[str]) -> list[tuple[str, str]]:
    """Nested modules holding the same weights on each side (outermost first), paired from the
    inside out; the longer side's leftover modules pair with the other side's outermost.

    >>> _pair_chains(["heads", "heads.head"], ["head"])
    [('heads.head', 'head'), ('heads', 'head')]
    """
    n = max(len(t_chain), len(s_chain))
    return [(t_chain[-1 - i] if i < len(t_chain) else t_chain[0], s_chain[-1 - i] if i < len(s_chain) else s_chain[0]) for i in range(n)]


# --------------------------------------------------------------------------- running with hooks


@dataclass
class _Recording:
    """Each hooked module's outputs, call by call (tensor leaves, on the CPU), and the order
    calls finished in: (module name, call index) per finished call."""

    outputs: dict[str, list[list[tuple[str, Any]]]] = field(default_factory=dict)
    finished: list[tuple[str, int]] = field(default_factory=list)


def _record(model: Any, names: Iterable[str], inputs: tuple[Sequence[Any], Mapping[str, Any]], side: str) -> _Recording:
    """Run ``model`` once (eval, no_grad) with a forward hook on each named module.

    The hooks are removed and every module's training flag is put back, also when the
    forward raises (a UsageError naming the side then).
    """
    import torch

    modules = dict(model.named_modules())
    rec = _Recording()
    flags = [(m, m.training) for m in model.modules()]
    handles = []

    def hook_for(name: str) -> Any:
        def hook(_module: Any, _args: Any, output: Any) -> None:
            calls = rec.outputs.setdefault(name, [])
            rec.finished.append((name, len(calls)))
            calls.append([(p, t.detach().to("cpu", copy=True)) for p, t in tensor_leaves(output)])

        return hook

    from .inputs import place_inputs

    args, kwargs = place_inputs(list(inputs[0]), dict(inputs[1]), model)  # in the model's own floating dtype and device
    try:
        for name in _unique(names):
            handles.append(modules[name].register_forward_hook(hook_for(name)))
        model.eval()
        with torch.no_grad():
            model(*[_copy(a) for a in args], **{k: _copy(v) for k, v in kwargs.items()})
    except Exception as exc:  # the user's model raising on the verify input
        raise UsageError(f"verify: the {side} model failed on the verify input while looking for the first divergence: "
                         f"{type(exc).__name__}: {exc}") from None  # fmt: skip
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.training = flag
    return rec


def _copy(value: Any) -> Any:
    import torch

    return value.clone() if isinstance(value, torch.Tensor) else value


# --------------------------------------------------------------------------- comparing


def first_divergence(source_model: Any, target_model: Any, inputs: tuple[Sequence[Any], Mapping[str, Any]],
                     records: Iterable[Any], *, atol: float, rtol: float, limit: int = 50) -> dict[str, Any]:  # fmt: skip
    """Run both models once more with hooks on the paired modules and find the first pair
    (in the order the target's calls finish) whose outputs differ beyond ``atol``/``rtol``.

    ``inputs`` is (args, kwargs), given to both (copied for each); ``records`` are the
    report's target records. Returns the report's ``divergence`` section: ``compared``
    (pairs whose outputs were compared), ``pairs`` (those, by the target's order of first
    finishing, at most ``limit``), ``unpaired`` (modules holding weights with no partner,
    at most ``limit`` a side, with totals), ``skipped`` (pairs not compared, with the
    reason), ``diverged`` (how many compared pairs differ) and ``first`` (None when every
    compared pair agrees). Neither model is changed: hooks are removed and training flags
    restored, also on errors.
    """
    pairing = pair_modules(source_model, target_model, records)
    t_rec = _record(target_model, (t for t, _ in pairing.pairs), inputs, "target")
    s_rec = _record(source_model, (s for _, s in pairing.pairs), inputs, "source")
    partners: dict[str, list[str]] = {}
    for t, s in pairing.pairs:
        partners.setdefault(t, []).append(s)
    skipped = {(t, s): why for t, s in pairing.pairs if (why := _why_not_comparable(t_rec.outputs.get(t), s_rec.outputs.get(s)))}
    outcome: dict[tuple[str, str], dict[str, Any]] = {}  # per compared pair: max_abs, max_rel, ok, call (first differing)
    first: dict[str, Any] | None = None
    for t, call in t_rec.finished:
        for s in (s for s in partners[t] if (t, s) not in skipped):
            got = compare([x for _, x in s_rec.outputs[s][call]], [y for _, y in t_rec.outputs[t][call]], atol=atol, rtol=rtol)
            seen = outcome.setdefault((t, s), {"max_abs": 0.0, "max_rel": 0.0, "ok": True, "call": None})
            seen["max_abs"], seen["max_rel"] = max(seen["max_abs"], got["max_abs"]), max(seen["max_rel"], got["max_rel"])
            if not got["ok"] and seen["ok"]:
                seen["ok"], seen["call"] = False, call
                if first is None:
                    first = _first(pairing, t, s, call, got)
    order = {name: i for i, (name, _) in reversed(list(enumerate(t_rec.finished)))}
    rank = {p: i for i, p in enumerate(pairing.pairs)}
    compared = sorted(outcome, key=lambda p: (order[p[0]], rank[p]))
    return {
        "compared": len(compared),
        "pairs": [list(p) for p in compared[:limit]],
        "unpaired": {"target": pairing.unpaired_target[:limit], "source": pairing.unpaired_source[:limit],
                     "target_total": len(pairing.unpaired_target), "source_total": len(pairing.unpaired_source)},  # fmt: skip
        "skipped": [{"target": t, "source": s, "reason": why} for (t, s), why in list(skipped.items())[:limit]],
        "diverged": sum(1 for v in outcome.values() if not v["ok"]),
        "first": first,
    }


def _why_not_comparable(t_calls: list[list[tuple[str, Any]]] | None, s_calls: list[list[tuple[str, Any]]] | None) -> str | None:
    """Why a pair's outputs cannot be compared (every call of it), or None when they can."""
    if not t_calls or not s_calls:
        return "not run in the target" if not t_calls else "not run in the source"
    if len(s_calls) != len(t_calls):
        return f"called {len(t_calls)} time(s) in the target, {len(s_calls)} in the source"
    for call, (t_out, s_out) in enumerate(zip(t_calls, s_calls)):
        at = f" (call {call + 1})" if len(t_calls) > 1 else ""
        if not t_out or not s_out:
            return f"no tensor in the {'target' if not t_out else 'source'}'s output{at}"
        if len(t_out) != len(s_out):
            return f"outputs differ in structure{at}: {len(t_out)} tensor(s) from the target, {len(s_out)} from the source"
        for (tp, ty), (sp, sx) in zip(t_out, s_out):
            if tuple(ty.shape) != tuple(sx.shape):
                return f"outputs differ in shape{at}: target {tp} {list(ty.shape)}, source {sp} {list(sx.shape)}"
    return None


def _first(pairing: ModulePairing, target: str, source: str, call: int, got: Mapping[str, Any]) -> dict[str, Any]:
    return {"target": target, "source": source, "max_abs": got["max_abs"], "max_rel": got["max_rel"], "call": call,
            "keys": list(pairing.keys[target]), "sources": list(pairing.sources[target]), "ops": list(pairing.ops[target])}  # fmt: skip


_PART = re.compile(r"\[\d+ of \d+\]$")


def _ops_summary(ops: Sequence[str]) -> str:
    """The ops that fed a module, each kind once: ``split(dim=0)[1 of 3]`` and
    ``split(dim=0)[0 of 3]`` are one ``split(dim=0)``.

    >>> _ops_summary(["split(dim=0)[1 of 3]", "split(dim=0)[0 of 3]", "cat(dim=0)[k, q, v]"])
    'split(dim=0), cat(dim=0)[k, q, v]'
    """
    return ", ".join(_unique(_PART.sub("", op) for op in ops))


def _module(name: str) -> str:
    return name or "(the whole model)"


def describe_divergence(d: Mapping[str, Any]) -> str:
    """One line for people.

    >>> describe_divergence({"compared": 3, "first": {"target": "enc.layers.1.attn", "source": "blocks.1.attn",
    ...     "max_abs": 0.81, "ops": ["split(dim=0)[1 of 3]", "cat(dim=0)[k, q, v]"], "call": 0}})
    'first divergence: target enc.layers.1.attn <- source blocks.1.attn (max abs 0.81); weights through split(dim=0), cat(dim=0)[k, q, v]'
    >>> describe_divergence({"compared": 4, "first": None})
    'no first divergence: the 4 compared module pair(s) agree; the difference arises outside them'
    """
    first = d.get("first")
    if first is None:
        if not d.get("compared"):
            return "no first divergence: no source and target modules could be paired and compared"
        return f"no first divergence: the {d['compared']} compared module pair(s) agree; the difference arises outside them"
    call = f", call {first['call'] + 1}" if first.get("call") else ""
    ops = f"weights through {_ops_summary(first['ops'])}" if first.get("ops") else "weights renamed only"
    return (f"first divergence: target {_module(first['target'])} <- source {_module(first['source'])} "
            f"(max abs {first['max_abs']:.3g}{call}); {ops}")  # fmt: skip
