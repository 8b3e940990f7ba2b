"""Aligning two key sets: which source key would feed which target key, and on what evidence.

:func:`align` is pure: it reads names, shapes and dtypes (key -> :class:`~remap.meta.TensorMeta`
on each side), never a tensor, and never guesses. Evidence is tried strongest first:

1. ``exact``  — the same name on both sides;
2. ``prefix`` — the same name once a common prefix is stripped, added or replaced
   (``module.``, ``model.``, ``backbone.`` …: found from the data, not from a list);
3. ``suffix`` — the longest common dotted suffix, when it names one key on each side;
4. ``offset`` — the same name with indices shifted, consistently over a whole family of
   keys (``features.3.*`` <-> ``features.4.*``);
5. ``structure`` — inside blocks or modules that correspond (repeated blocks with indices
   abstracted, ``blocks.#`` <-> ``encoder.layers.encoder_layer_#``, whose instances hold the
   same shapes; or the one module on each side holding a set of shapes): submodules by
   their shapes, then leaves by name or shape; same-shaped ones by the numbers their
   names end with (``norm1``, ``norm2`` ~ ``ln_1``, ``ln_2``), else not at all. Then what
   the pairs found so far pin down: an instance of a block pairs an inner key as the other
   instances do; a module holding the same shapes as one on the other side, where every
   pair found under either lands under the other, is paired inside (``downsample`` ~
   ``shortcut`` once ``downsample.0`` ~ ``shortcut.convolution``); a module numbered like a
   paired sibling goes where that sibling went (``bn1`` beside ``conv1`` ->
   ``layer.0.convolution`` goes into ``layer.0``). Numbers include order words
   (``layernorm_before``, ``layernorm_after`` ~ ``norm1``, ``norm2``) and a module's place in
   its block (``layer.0.convolution`` ~ ``conv1``). A fused key whose name lists its parts
   (``attn.qkv`` ~ ``attention.q_proj``, ``k_proj``, ``v_proj``) in modules that correspond
   is a split (or, the other way, a merge), in the name's order, even beside a same-shaped
   ``o_proj``: a :class:`Regroup` with its ``detail``. Definition order is never evidence: a
   library may declare a block's modules in any order;
6. ``module`` — the same leaf name inside modules that already correspond;
7. ``graph``  — an ONNX source only (its names are often graph-internal, ``onnx::Conv_123``):
   the role an initializer plays in the node that reads it (``Conv`` input 1 is a weight,
   ``MatMul`` input 1 a linear weight stored (in, out)) and its shape, when one key on each
   side fits; else, among the keys that fit, the order the graph reads them against the
   order the target's forward pass calls the modules holding them (the target run once on
   meta input of the graph's input shapes). Not from a module's definition order; what
   neither tells apart stays a choice (see :mod:`remap.diffing.graph_evidence`);
8. ``shape``  — the only key of its shape left on either side (the weakest: check it).

Two candidates that nothing tells apart are never paired: they become a :class:`Choice`.
A pairing whose shapes differ carries a :class:`Conflict` with the ops that could fix it.

>>> a = align({"module.fc.weight": [10, 4], "module.fc.bias": [10]}, {"fc.weight": [10, 4], "fc.bias": [10]})
>>> [(p.source, p.target, p.evidence) for p in a.pairs]
[('module.fc.weight', 'fc.weight', 'prefix'), ('module.fc.bias', 'fc.bias', 'prefix')]
>>> a.prefixes[0].describe()
"strip 'module.'"

Nothing here imports torch; :func:`diff` (which opens checkpoints and builds factories)
imports it when called.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..meta import TargetMeta, TensorMeta, source_meta, target_meta
from .graph_evidence import ForwardEvidence, GraphEvidence

__all__ = [
    "EVIDENCE",
    "EVIDENCE_WORDS",
    "Alignment",
    "Pair",
    "Conflict",
    "Choice",
    "PrefixChange",
    "Regroup",
    "align",
    "diff",
    "candidate_ops",
    "index_tokens",
    "tokens",
]

Shape = tuple[int, ...]

#: Kinds of evidence, strongest first.
EVIDENCE = ("exact", "prefix", "suffix", "offset", "structure", "module", "graph", "shape")
#: How each kind reads in a table or a comment.
EVIDENCE_WORDS = {
    "exact": "same name",
    "prefix": "same name after a prefix change",
    "suffix": "longest common dotted suffix",
    "offset": "same name with indices shifted",
    "structure": "same place and shape in corresponding blocks or modules",
    "module": "same name in corresponding modules",
    "graph": "same role and shape in the ONNX graph, told apart by graph order against forward order",
    "shape": "only key of its shape on both sides",
}

_TRAILING = re.compile(r"^(.*_)(0|[1-9][0-9]*)$")  # encoder_layer_3, ln_1: digits after an underscore
_DIGITS = re.compile(r"([0-9]+)$")
_MAX_TAIL_KEYS = 32  # a name tail shared by more target keys than this says nothing about prefixes
_MAX_PARTS = 4  # split/merge suggested for 2 to 4 parts (gate+up, q+k+v, ...), not for a 1000-class head
#: Words that end a module's name (after ``_``) and say its place as a number would: ``layernorm_before``,
#: ``layernorm_after`` ~ ``norm1``, ``norm2`` (a shift is allowed: see ``_ranked``). Names, not definition order.
_ORDER_WORDS = {"before": 0, "after": 1, "pre": 0, "post": 1, "first": 0, "second": 1, "third": 2}


@functools.lru_cache(maxsize=65536)
def _is_index(comp: str) -> bool:
    """A whole dotted component that is a canonical non-negative integer (``"07"`` is a name)."""
    return comp.isascii() and comp.isdigit() and (comp == "0" or comp[0] != "0")


def index_tokens(key: str) -> list[tuple[str, bool]]:
    """See :func:`tokens` (a list, for reading)."""
    return list(tokens(key))


@functools.lru_cache(maxsize=262144)
def tokens(key: str) -> tuple[tuple[str, bool], ...]:
    """``key`` as literal text and index tokens: a whole numeric component, or digits that
    end a component after an underscore (``encoder_layer_3``). Digits glued to letters
    (``norm1``, ``layer1``) are part of a name.

    >>> index_tokens("encoder.layers.encoder_layer_3.ln_1.weight")
    [('encoder.layers.encoder_layer_', False), ('3', True), ('.ln_', False), ('1', True), ('.weight', False)]
    >>> index_tokens("blocks.0.norm1.weight")
    [('blocks.', False), ('0', True), ('.norm1.weight', False)]
    """
    out: list[tuple[str, bool]] = []

    def text(t: str) -> None:
        if out and not out[-1][1]:
            out[-1] = (out[-1][0] + t, False)
        elif t:
            out.append((t, False))

    for n, comp in enumerate(key.split(".")):
        if n:
            text(".")
        if _is_index(comp):
            out.append((comp, True))
            continue
        m = _TRAILING.match(comp)
        if m:
            text(m.group(1))
            out.append((m.group(2), True))
        else:
            text(comp)
    return tuple(out)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Conflict:
    """A pairing whose shapes differ: the ops that could fix it (for people) and, when one
    op certainly does (``transpose``, ``permute``, or ``reshape`` when only size-1 dims
    differ), the one that ``--write`` writes."""

    source_shape: Shape
    target_shape: Shape
    ops: tuple[str, ...]
    fix: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"source_shape": list(self.source_shape), "target_shape": list(self.target_shape),
                "ops": list(self.ops), "fix": self.fix}  # fmt: skip


@dataclass(frozen=True)
class Pair:
    """One proposed pairing, its evidence (one of :data:`EVIDENCE`) and a detail that says
    which prefix, suffix, offset, blocks or modules it rests on."""

    source: str
    target: str
    evidence: str
    detail: str
    source_shape: Shape
    target_shape: Shape
    conflict: Conflict | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "evidence": self.evidence, "detail": self.detail,
                "source_shape": list(self.source_shape), "target_shape": list(self.target_shape),
                "conflict": self.conflict.to_dict() if self.conflict else None}  # fmt: skip


@dataclass(frozen=True)
class Choice:
    """Keys that nothing tells apart: each source key could feed any of the target keys
    (same shape; names and structure say nothing). Never paired: the user chooses."""

    shape: Shape
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "sources": list(self.sources), "targets": list(self.targets), "reason": self.reason}


@dataclass(frozen=True)
class Regroup:
    """Leftover keys that one op could join: ``merge`` the ``sources`` (same shape, sibling
    modules) along ``dim`` into the one target, or ``split`` the one source into the
    ``targets``. Without ``detail``, a candidate found among leftovers: shown, never written
    (the order of the parts is the user's to check). With ``detail``, the fused name lists
    its parts in order (``qkv`` ~ ``q_proj``, ``k_proj``, ``v_proj``; ``gate_up`` ~
    ``gate``, ``up``) inside modules that correspond: the parts are in that order, and
    ``remap diff --write`` writes the ``split`` or ``merge``."""

    kind: str
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    dim: int
    detail: str = ""

    def describe(self) -> str:
        n = len(self.sources) if self.kind == "merge" else len(self.targets)
        return f"{self.kind} {n} along dim {self.dim}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "sources": list(self.sources), "targets": list(self.targets), "dim": self.dim,
                "detail": self.detail}  # fmt: skip


@dataclass(frozen=True)
class PrefixChange:
    """A prefix change found in the data: ``strip`` removed from source keys, then ``add``
    put in front; ``keys`` is how many pairings it made."""

    strip: str
    add: str
    keys: int = 0

    def apply(self, key: str) -> str | None:
        if not key.startswith(self.strip):
            return None
        return self.add + key[len(self.strip) :]

    def describe(self) -> str:
        """``strip 'module.'``, ``add 'bert.'`` or ``replace 'backbone.' with 'encoder.'``."""
        if self.strip and self.add:
            return f"replace '{self.strip}' with '{self.add}'"
        return f"strip '{self.strip}'" if self.strip else f"add '{self.add}'"

    def to_dict(self) -> dict[str, Any]:
        return {"strip": self.strip, "add": self.add, "keys": self.keys}


@dataclass(frozen=True)
class Alignment:
    """How two key sets line up. ``pairs`` are in source order; ``choices`` are the
    ambiguities; ``source_only``/``target_only`` are what nothing pairs (outside the
    choices); ``tied`` are target aliases of tied parameters, which need no source."""

    source: Mapping[str, TensorMeta]
    target: Mapping[str, TargetMeta]
    pairs: tuple[Pair, ...]
    choices: tuple[Choice, ...] = ()
    source_only: tuple[str, ...] = ()
    target_only: tuple[str, ...] = ()
    prefixes: tuple[PrefixChange, ...] = ()
    tied: tuple[str, ...] = ()
    source_description: Mapping[str, Any] = field(default_factory=dict)
    target_description: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    regroups: tuple[Regroup, ...] = ()
    held: tuple[str, ...] = ()  # target keys a draft leaves undeclared whatever their shape (see the notes)

    @property
    def conflicts(self) -> tuple[Pair, ...]:
        return tuple(p for p in self.pairs if p.conflict is not None)

    def counts(self) -> dict[str, int]:
        """Pairs by evidence, in :data:`EVIDENCE` order, kinds with none left out."""
        c = Counter(p.evidence for p in self.pairs)
        return {e: c[e] for e in EVIDENCE if c[e]}

    def totals(self) -> dict[str, Any]:
        return {
            "source_keys": len(self.source),
            "target_keys": len(self.target) - len(self.tied),
            "paired": len(self.pairs),
            "paired_targets": sum(p.target not in set(self.tied) for p in self.pairs),
            "by_evidence": self.counts(),
            "conflicts": len(self.conflicts),
            "ambiguous_source_keys": sum(len(c.sources) for c in self.choices),
            "ambiguous_target_keys": sum(len(c.targets) for c in self.choices),
            "source_only": len(self.source_only),
            "target_only": len(self.target_only),
        }

    def to_dict(self) -> dict[str, Any]:
        """The alignment as JSON-able data (``remap diff --json``), schema version 1."""
        return {
            "version": 1,
            "source": dict(self.source_description),
            "target": dict(self.target_description),
            "totals": self.totals(),
            "prefixes": [p.to_dict() for p in self.prefixes],
            "pairs": [p.to_dict() for p in self.pairs],
            "ambiguous": [c.to_dict() for c in self.choices],
            "source_only": [{"key": k, "shape": list(self.source[k].shape)} for k in self.source_only],
            "target_only": [{"key": k, "shape": list(self.target[k].shape)} for k in self.target_only],
            "tied": list(self.tied),
            "notes": list(self.notes),
            "regroups": [r.to_dict() for r in self.regroups],
            "held": list(self.held),
        }


# --------------------------------------------------------------------------- shape conflicts


def _squeezed(shape: Shape) -> Shape:
    return tuple(d for d in shape if d != 1)


def candidate_ops(source: Sequence[int], target: Sequence[int]) -> Conflict:
    """What could turn a tensor of shape ``source`` into one of shape ``target``.

    >>> candidate_ops((64, 192), (192, 64)).ops
    ('transpose',)
    >>> candidate_ops((1000, 512), (10, 512)).ops
    ('slice dim 0 (1000 -> 10)',)
    >>> candidate_ops((192, 64), (64, 64)).ops
    ('slice dim 0 (192 -> 64)', 'split dim 0 into 3 (as qkv)')
    >>> candidate_ops((768, 768, 1, 1), (768, 768)).fix
    'reshape'
    """
    s, t = tuple(source), tuple(target)
    ops: list[str] = []
    fix = None
    if len(s) >= 2 and s[::-1] == t and s != t:
        if len(s) == 2:
            ops.append("transpose")
            fix = "transpose"
        else:
            ops.append(f"permute {list(range(len(s) - 1, -1, -1))}")
            fix = "permute"
    if len(s) == len(t):
        diff = [d for d in range(len(s)) if s[d] != t[d]]
        if len(diff) == 1:
            d = diff[0]
            a, b = s[d], t[d]
            if a > b:
                ops.append(f"slice dim {d} ({a} -> {b})")
                if b and a % b == 0 and a // b <= _MAX_PARTS:
                    ops.append(f"split dim {d} into {a // b}" + (" (as qkv)" if a // b == 3 else ""))
            else:
                ops.append(f"pad dim {d} ({a} -> {b})")
                if a and b % a == 0 and b // a <= _MAX_PARTS:
                    ops.append(f"merge {b // a} along dim {d}" + (" (as qkv)" if b // a == 3 else ""))
            if len(s) == 4 and d == 1:
                ops.append(f"adapt in_channels ({a} -> {b})")
            if len(s) == 3 and d == 1 and _grid(a) and _grid(b):
                ops.append(f"adapt interpolate ({a} -> {b} tokens)")
    if fix is None and math.prod(s) == math.prod(t):
        if _squeezed(s) == _squeezed(t):
            ops.append("reshape (only size-1 dims differ)")
            fix = "reshape"
        else:
            ops.append("reshape (same number of elements)")
    return Conflict(s, t, tuple(ops), fix)


def _grid(tokens: int) -> bool:
    """A square grid of patches, with or without one class token."""
    return any(n > 1 and math.isqrt(n) ** 2 == n for n in (tokens, tokens - 1))


# --------------------------------------------------------------------------- the aligner


def _parent(key: str) -> str:
    return key.rpartition(".")[0]


def _leaf(key: str) -> str:
    return key.rpartition(".")[2]


def _pattern(key: str) -> str:
    """Whole numeric components abstracted: ``features.3.weight`` -> ``features.#.weight``."""
    return ".".join("#" if _is_index(c) else c for c in key.split("."))


def _common_module(keys: Sequence[str]) -> list[str]:
    """The components of the deepest module holding every key."""
    parts = [_parent(k).split(".") if _parent(k) else [] for k in keys]
    out: list[str] = []
    for comps in zip(*parts):
        if len(set(comps)) != 1:
            break
        out.append(comps[0])
    return out


def _name_parts(module: str) -> list[list[str]]:
    """Ways a fused module's name lists its parts: its ``_``-separated words
    (``gate_up_proj`` -> gate, up, proj; and without the last), and the letters of a first
    word of two or three letters (``qkv`` or ``qkv_proj`` -> q, k, v; ``kv`` -> k, v).

    >>> _name_parts("qkv"), _name_parts("gate_up_proj")
    ([['q', 'k', 'v']], [['gate', 'up', 'proj'], ['gate', 'up']])
    """
    words = [w for w in re.split(r"[_\-]", module) if w]
    out: list[list[str]] = []
    if len(words) >= 2:
        out.append(words)
        if len(words) >= 3:
            out.append(words[:-1])
    if words and 2 <= len(words[0]) <= 3 and words[0].isalpha() and words[0].islower() and len(set(words[0])) == len(words[0]):
        out.append(list(words[0]))
    return out


class _Aligner:
    def __init__(self, src: Mapping[str, TensorMeta], tgt: Mapping[str, TargetMeta], graph: GraphEvidence | None = None,
                 forward: ForwardEvidence | None = None) -> None:  # fmt: skip
        self.src = src
        self.tgt = tgt
        self.graph_s = graph
        self.forward_t = forward
        self.held: tuple[str, ...] = ()
        self.unpairable: set[str] = set()
        self.graph_notes: list[str] = list(graph.notes) if graph is not None else []
        self.tied = tuple(k for k, m in tgt.items() if m.tied_to is not None)
        self.free_s: dict[str, None] = dict.fromkeys(src)
        self.free_t: dict[str, None] = dict.fromkeys(k for k, m in tgt.items() if m.tied_to is None)
        self.order_s = {k: i for i, k in enumerate(src)}
        self.order_t = {k: i for i, k in enumerate(tgt)}
        self.pairs: dict[str, Pair] = {}
        self.deferred: list[tuple[str, str, str, str]] = []  # name evidence whose shapes differ
        self.prefixes: list[PrefixChange] = []
        self.named_regroups: list[Regroup] = []  # splits/merges whose fused name lists its parts (see fused)

    # ---- bookkeeping

    def shape_s(self, key: str) -> Shape:
        return self.src[key].shape

    def shape_t(self, key: str) -> Shape:
        return self.tgt[key].shape

    def pair(self, s: str, t: str, evidence: str, detail: str, *, defer: bool = True, conflict: Conflict | None = None) -> bool:
        """Pair ``s`` with ``t``; name evidence with different shapes waits until the end
        (a later kind of evidence may explain both keys better). ``conflict`` is a layout
        difference the shapes cannot show (a square weight stored transposed)."""
        if s not in self.free_s or t not in self.free_t:
            return False
        ss, ts = self.shape_s(s), self.shape_t(t)
        if ss != ts and defer:
            self.deferred.append((s, t, evidence, detail))
            return False
        if conflict is None:
            conflict = candidate_ops(ss, ts) if ss != ts else None
        self.pairs[s] = Pair(s, t, evidence, detail, ss, ts, conflict)
        del self.free_s[s]
        del self.free_t[t]
        return True

    # ---- 1. exact

    def exact(self) -> None:
        for s in list(self.free_s):
            if s in self.tgt:
                if self.tgt[s].tied_to is not None:  # a source copy of a tied alias: the planner checks it
                    if self.shape_s(s) == self.shape_t(s):
                        self.pairs[s] = Pair(s, s, "exact", "same name", self.shape_s(s), self.shape_t(s))
                        del self.free_s[s]
                    continue
                self.pair(s, s, "exact", "same name")

    # ---- 2. prefix

    def prefix(self) -> None:
        """Prefix changes (strip, add, or replace one with another) found in the data: the
        ones that turn at least two source keys into target keys of the same shape."""
        tails: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for t in self.free_t:
            comps = t.split(".")
            for j in range(len(comps)):
                tails[".".join(comps[j:])].append((".".join(comps[:j]) + "." if j else "", t))
        support: Counter[tuple[str, str]] = Counter()
        claims: dict[str, set[tuple[str, str]]] = defaultdict(set)
        for s in self.free_s:
            comps = s.split(".")
            names = [not _is_index(c) for c in comps]
            for i in range(len(comps)):
                tail_comps = comps[i:]
                head_s = ".".join(comps[:i]) + "." if i else ""
                named = sum(names[i:])
                tail = ".".join(tail_comps)
                found = tails.get(tail, ())
                if len(found) > _MAX_TAIL_KEYS:  # 'weight', 'attn.qkv.weight': a longer tail says more
                    found = [("", tail)] if head_s and tail in self.free_t else ()  # a stripped prefix still counts
                for head_t, t in found:
                    if head_s == head_t:
                        continue
                    if head_s and head_t and named < 2:
                        continue  # a replaced prefix needs a tail that names something
                    if self.shape_s(s) == self.shape_t(t):
                        support[(head_s, head_t)] += 1
                    claims[s].add((head_s, head_t))
        ranked = sorted(support.items(), key=lambda kv: -kv[1])
        accepted: list[tuple[str, str]] = []
        for (head_s, head_t), n in ranked:
            if n < 2 and (head_s and head_t or len(self.free_s) > 1):
                continue
            accepted.append((head_s, head_t))
        made: Counter[tuple[str, str]] = Counter()
        for s in list(self.free_s):
            mine = [c for c in accepted if c in claims.get(s, ())]
            if not mine:
                continue
            best = max(support[c] for c in mine)
            top = [c for c in mine if support[c] == best]
            if len(top) > 1:
                continue  # two prefix changes explain this key equally well: not a guess to make
            head_s, head_t = top[0]
            t = head_t + s[len(head_s) :]
            change = PrefixChange(head_s, head_t)
            if t in self.free_t and s in self.free_s:
                if self.pair(s, t, "prefix", change.describe()):
                    made[top[0]] += 1
        for (head_s, head_t), n in sorted(made.items(), key=lambda kv: -kv[1]):
            if n:
                self.prefixes.append(PrefixChange(head_s, head_t, n))

    def normalise(self, key: str) -> str:
        """A source key under the prefix changes found (the first that applies)."""
        for change in self.prefixes:
            new = change.apply(key)
            if new is not None:
                return new
        return key

    # ---- 3. suffix

    @staticmethod
    def _suffixes(key: str) -> list[str]:
        """Dotted suffixes of at least two components that start with a name, longest first."""
        comps = key.split(".")
        return [".".join(comps[i:]) for i in range(len(comps) - 1) if not _is_index(comps[i])]

    def suffix(self) -> None:
        by_t: dict[str, list[str]] = defaultdict(list)
        for t in self.free_t:
            for suf in self._suffixes(t):
                by_t[suf].append(t)
        by_s: dict[str, list[str]] = defaultdict(list)
        for s in self.free_s:
            for suf in self._suffixes(s):
                by_s[suf].append(s)
        for s in list(self.free_s):
            hit = next(((suf, by_t[suf]) for suf in self._suffixes(s) if suf in by_t), None)
            if hit is None or len(hit[1]) != 1:
                continue
            suf, (t,) = hit
            back = next(((sf, by_s[sf]) for sf in self._suffixes(t) if sf in by_s), None)
            if back is None or back[0] != suf or back[1] != [s]:
                continue
            self.pair(s, t, "suffix", f"common suffix '{suf}'")

    # ---- 4. index offset

    def offset(self) -> None:
        fam_s: dict[tuple[str, str], list[tuple[str, tuple[int, ...]]]] = defaultdict(list)
        fam_t: dict[tuple[str, str], dict[tuple[int, ...], str]] = defaultdict(dict)

        def split(key: str) -> tuple[str, str, tuple[int, ...]] | None:
            comps = key.split(".")
            idx = [i for i, c in enumerate(comps) if _is_index(c)]
            if not idx:
                return None
            pat = _pattern(key)
            family = ".".join("#" if _is_index(c) else c for c in comps[: idx[-1] + 1])
            return family, pat, tuple(int(comps[i]) for i in idx)

        norm: dict[str, str] = {}
        for s in self.free_s:
            n = self.normalise(s)
            got = split(n)
            if got:
                norm[s] = n
                fam_s[(got[0], got[1])].append((s, got[2]))
        for t in self.free_t:
            got = split(t)
            if got:
                fam_t[(got[0], got[1])][got[2]] = t
        votes: dict[str, Counter[tuple[int, ...]]] = defaultdict(Counter)
        for (family, pat), members in fam_s.items():
            targets = fam_t.get((family, pat))
            if not targets or len(members) * len(targets) > 250_000:
                continue
            for s, idx in members:
                for tidx, t in targets.items():
                    if len(tidx) == len(idx) and self.shape_s(s) == self.shape_t(t):
                        votes[family][tuple(b - a for a, b in zip(idx, tidx))] += 1
        for family, counter in votes.items():
            ranked = counter.most_common(2)
            if not ranked or (len(ranked) > 1 and ranked[0][1] == ranked[1][1]):
                continue  # no offset, or two equally good ones
            delta, n = ranked[0]
            if not any(delta) or n < 2:
                continue
            proposed = []
            for (fam, pat), members in fam_s.items():
                if fam != family:
                    continue
                for s, idx in members:
                    t = fam_t[(fam, pat)].get(tuple(a + d for a, d in zip(idx, delta))) if (fam, pat) in fam_t else None
                    if t is not None and self.shape_s(s) == self.shape_t(t):
                        proposed.append((s, t))
            if len(proposed) < 2:
                continue
            shift = ", ".join(f"{d:+d}" for d in delta)
            for s, t in proposed:
                self.pair(s, t, "offset", f"index {shift} in '{family}'")

    # ---- 5. structure

    def _number(self, name: str) -> int | None:
        """The number a module's name ends with: ``norm1`` 1, ``ln_2`` 2, ``mlp.3`` 3; or the
        place an order word at its end says (``layernorm_before`` 0, ``layernorm_after`` 1:
        see :data:`_ORDER_WORDS`); else the index it sits at inside its block
        (``layer.0.convolution`` 0, ~ ``conv1`` when the numbers shift alike)."""
        last = name.rpartition(".")[2]
        m = _DIGITS.search(last)
        if m:
            return int(m.group(1))
        word = re.split(r"[_\-]", last)[-1].lower() if ("_" in last or "-" in last) else ""
        if word in _ORDER_WORDS:
            return _ORDER_WORDS[word]
        comps = name.split(".")  # layer.0.convolution, inside a block: its place in 'layer' (one index, no other)
        places = [c for c in comps if _is_index(c)]
        return int(comps[-2]) if len(comps) == 3 and len(places) == 1 and _is_index(comps[-2]) else None

    def _ranked(self, ss: list[str], tt: list[str], names_s: list[str], names_t: list[str],
                inside: bool = True) -> tuple[list[tuple[str, str]], str] | None:  # fmt: skip
        """Equally many same-shaped things on both sides, told apart (only ``inside`` a block
        or module, never among top-level keys, which share no module) by the numbers their
        names end with when both sides number them alike (``norm1``, ``norm2`` ~ ``ln_1``,
        ``ln_2``; or shifted, ``conv1..3`` ~ ``conv_0..2``); None when nothing tells them
        apart. Definition order is not evidence: a library may declare a block's modules in
        any order (Hugging Face's ResNet declares the shortcut before the layers)."""
        if len(ss) != len(tt):
            return None
        if len(ss) == 1:
            return [(ss[0], tt[0])], ""
        if not inside:
            return None
        ns = [self._number(n) for n in names_s]
        nt = [self._number(n) for n in names_t]
        if None not in ns and None not in nt and len(set(ns)) == len(ns) and len(set(nt)) == len(nt):
            shift = {b - a for a, b in zip(sorted(ns), sorted(nt))}  # type: ignore[type-var]
            if len(shift) == 1:
                return [(a, b) for (_, a), (_, b) in zip(sorted(zip(ns, ss)), sorted(zip(nt, tt)))], "by number"
        return None

    def _match(self, rel_s: dict[str, str], rel_t: dict[str, str], inside: bool = True) -> list[tuple[str, str, str]]:
        """Pair the keys of two corresponding containers (key -> name inside the container):
        the same inner name; modules by their shapes (ties broken by number or order); leaves
        in paired modules by name or shape; what is left by a shape unique in the container."""
        out: list[tuple[str, str, str]] = []
        used_s: set[str] = set()
        used_t: set[str] = set()

        def take(s: str, t: str, how: str) -> None:
            out.append((s, t, how))
            used_s.add(s)
            used_t.add(t)

        by_name = {r: t for t, r in rel_t.items()}
        for s, r in rel_s.items():
            t = by_name.get(r)
            if t is not None and self.shape_s(s) == self.shape_t(t):
                take(s, t, "")
        mods_s: dict[str, list[str]] = defaultdict(list)
        mods_t: dict[str, list[str]] = defaultdict(list)
        for s, r in rel_s.items():
            if s not in used_s:
                mods_s[_parent(r)].append(s)
        for t, r in rel_t.items():
            if t not in used_t:
                mods_t[_parent(r)].append(t)
        sig_s: dict[tuple[Shape, ...], list[str]] = defaultdict(list)
        sig_t: dict[tuple[Shape, ...], list[str]] = defaultdict(list)
        for m, keys in mods_s.items():
            sig_s[tuple(sorted(self.shape_s(k) for k in keys))].append(m)
        for m, keys in mods_t.items():
            sig_t[tuple(sorted(self.shape_t(k) for k in keys))].append(m)
        for sig, ms in sig_s.items():
            mt = sig_t.get(sig, [])
            ranked = self._ranked(ms, mt, ms, mt, inside)
            if ranked is None:
                continue
            for m_s, m_t in ranked[0]:
                self._leaves(mods_s[m_s], mods_t[m_t], rel_s, rel_t, ranked[1], take)
        rest_s = [s for s in rel_s if s not in used_s]
        rest_t = [t for t in rel_t if t not in used_t]
        self._by_shape(rest_s, rest_t, rel_s, rel_t, "", take, inside)
        return out

    def _leaves(self, ss: list[str], tt: list[str], rel_s: dict[str, str], rel_t: dict[str, str], how: str, take: Any) -> None:
        leaves_s = {_leaf(rel_s[s]): s for s in ss}
        leaves_t = {_leaf(rel_t[t]): t for t in tt}
        if set(leaves_s) == set(leaves_t) and all(self.shape_s(leaves_s[n]) == self.shape_t(leaves_t[n]) for n in leaves_s):
            for n, s in leaves_s.items():
                take(s, leaves_t[n], how)
            return
        self._by_shape(ss, tt, rel_s, rel_t, how, take)

    def _by_shape(self, ss: list[str], tt: list[str], rel_s: dict[str, str], rel_t: dict[str, str], how: str, take: Any,
                  inside: bool = True) -> None:  # fmt: skip
        by_s, by_t = self._by_shapes(ss, tt)
        for shape, group_s in by_s.items():
            group_t = by_t.get(shape, [])
            ranked = self._ranked(group_s, group_t, [rel_s[s] for s in group_s], [rel_t[t] for t in group_t], inside)
            if ranked is not None:
                for s, t in ranked[0]:
                    take(s, t, ranked[1] or how or "unique shape")

    def _by_shapes(self, ss: Iterable[str], tt: Iterable[str]) -> tuple[dict[Shape, list[str]], dict[Shape, list[str]]]:
        """Source keys ``ss`` and target keys ``tt`` bucketed by shape, in their order."""
        by_s: dict[Shape, list[str]] = defaultdict(list)
        by_t: dict[Shape, list[str]] = defaultdict(list)
        for s in ss:
            by_s[self.shape_s(s)].append(s)
        for t in tt:
            by_t[self.shape_t(t)].append(t)
        return by_s, by_t

    def _pair_all(self, matched: Iterable[tuple[str, str, str]], detail: str, *, top: bool = False) -> int:
        """Pair what :meth:`_match` found. At the top level, which always corresponds, a key
        paired because its shape is unique there rests on its shape alone."""
        made = 0
        for s, t, how in matched:
            if top and how == "unique shape":
                made += self.pair(s, t, "shape", f"the only {list(self.shape_s(s))} at the top level", defer=False)
                continue
            how = "" if how == "unique shape" else how
            made += self.pair(s, t, "structure", f"{detail}, {how}" if how else detail, defer=False)
        return made

    def families(self) -> int:
        """Repeated blocks (an index abstracted: ``blocks.#``, ``encoder.layers.encoder_layer_#``)
        whose instances hold the same shapes on both sides, and only one such family on each
        side: paired instance by instance, then inside each instance, checking that every
        instance pairs its keys the same way."""

        def collect(keys: Iterable[str]) -> dict[tuple[str, ...], dict[int, list[str]]]:
            fams: dict[tuple[str, ...], dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
            for key in keys:
                comps = key.split(".")
                for j, comp in enumerate(comps[:-1]):
                    if _is_index(comp):
                        fams[(*comps[:j], "#")][int(comp)].append(key)
                        continue
                    m = _TRAILING.match(comp)
                    if m:
                        fams[(*comps[:j], m.group(1) + "#")][int(m.group(2))].append(key)
            return {t: i for t, i in fams.items() if len(i) >= 2 and (t[-1] == "#" or 0 in i)}  # ln_1, ln_2: names, not an index

        def signature(inst: dict[int, list[str]], shape: Any) -> tuple[Any, ...]:
            lo = min(inst)
            return tuple((v - lo, tuple(sorted(shape(k) for k in inst[v]))) for v in sorted(inst))

        fs, ft = collect(self.free_s), collect(self.free_t)
        sig_s: dict[tuple[Any, ...], list[tuple[str, ...]]] = defaultdict(list)
        sig_t: dict[tuple[Any, ...], list[tuple[str, ...]]] = defaultdict(list)
        for tmpl, inst in fs.items():
            sig_s[signature(inst, self.shape_s)].append(tmpl)
        for tmpl, inst in ft.items():
            sig_t[signature(inst, self.shape_t)].append(tmpl)
        candidates = []
        for sig, tmpls in sig_s.items():
            other = sig_t.get(sig)
            if other and len(tmpls) == 1 and len(other) == 1:
                candidates.append((sum(len(shapes) for _, shapes in sig), tmpls[0], other[0]))
        made = 0
        for _, ts_, tt_ in sorted(candidates, key=lambda c: (-c[0], c[1])):
            inst_s, inst_t = fs[ts_], ft[tt_]
            if any(k not in self.free_s for v in inst_s.values() for k in v) or any(k not in self.free_t for v in inst_t.values() for k in v):
                continue
            instances: list[tuple[str, str, list[str], list[str], list[tuple[str, str, str]]]] = []
            seen: dict[str, tuple[str, str]] = {}
            back: dict[str, str] = {}
            consistent = True
            for vs, vt in zip(sorted(inst_s), sorted(inst_t)):
                base_s = ".".join(ts_[:-1] + (ts_[-1].replace("#", str(vs)),)) + "."
                base_t = ".".join(tt_[:-1] + (tt_[-1].replace("#", str(vt)),)) + "."
                found = self._match({k: k[len(base_s) :] for k in inst_s[vs]}, {k: k[len(base_t) :] for k in inst_t[vt]})
                for s, t, how in found:
                    rs, rt = s[len(base_s) :], t[len(base_t) :]
                    if seen.setdefault(rs, (rt, how))[0] != rt or back.setdefault(rt, rs) != rs:
                        consistent = False  # two instances pair one inner key differently: no rule says which
                instances.append((base_s, base_t, inst_s[vs], inst_t[vt], found))
            if consistent:
                matched = [m for *_, found in instances for m in found]
                matched += self._as_in_other_instances(instances, seen)
                made += self._pair_all(matched, f"'{'.'.join(ts_)}' ~ '{'.'.join(tt_)}'")
        return made

    def _as_in_other_instances(self, instances: Sequence[tuple[str, str, list[str], list[str], list[tuple[str, str, str]]]],
                               seen: Mapping[str, tuple[str, str]]) -> list[tuple[str, str, str]]:  # fmt: skip
        """Inner keys that one instance of a family could not tell apart (``conv3`` and
        ``downsample.0``, same-shaped in the first block only) paired as the other instances
        pair them: the same inner name to the same inner name."""
        out = []
        for base_s, base_t, keys_s, keys_t, found in instances:
            done_s = {s for s, _, _ in found}
            done_t = {t for _, t, _ in found}
            free_t = set(keys_t) - done_t
            for s in keys_s:
                rs = s[len(base_s) :]
                if s in done_s or rs not in seen:
                    continue
                t = base_t + seen[rs][0]
                if t in free_t and self.shape_s(s) == self.shape_t(t):
                    out.append((s, t, "as in the other instances"))
                    free_t.discard(t)
        return out

    def containers(self) -> int:
        """Modules (any ancestor prefix, the root included) whose free keys hold the same
        shapes, one such module on each side: paired inside (see :meth:`_match`)."""

        def collect(keys: Iterable[str]) -> dict[tuple[str, ...], str]:
            members: dict[str, list[str]] = defaultdict(list)
            for key in keys:
                comps = key.split(".")
                members[""].append(key)
                for j in range(1, len(comps)):
                    members[".".join(comps[:j])].append(key)
            deepest: dict[tuple[str, ...], str] = {}
            for name, keys_ in members.items():
                k = tuple(keys_)
                if k not in deepest or len(name) > len(deepest[k]):
                    deepest[k] = name
            return deepest

        cs, ct = collect(self.free_s), collect(self.free_t)
        sig_s: dict[tuple[Shape, ...], list[tuple[str, ...]]] = defaultdict(list)
        sig_t: dict[tuple[Shape, ...], list[tuple[str, ...]]] = defaultdict(list)
        for keys in cs:
            sig_s[tuple(sorted(self.shape_s(k) for k in keys))].append(keys)
        for keys in ct:
            sig_t[tuple(sorted(self.shape_t(k) for k in keys))].append(keys)
        made = 0
        for sig in sorted(sig_s, key=lambda s: -len(s)):
            if len(sig_s[sig]) != 1 or len(sig_t.get(sig, ())) != 1:
                continue
            ss, tt = sig_s[sig][0], sig_t[sig][0]
            if any(k not in self.free_s for k in ss) or any(k not in self.free_t for k in tt):
                continue
            ns, nt = cs[ss], ct[tt]
            found = self._match({k: k[len(ns) + 1 :] if ns else k for k in ss}, {k: k[len(nt) + 1 :] if nt else k for k in tt},
                                inside=bool(ns or nt))  # fmt: skip
            made += self._pair_all(found, f"'{ns or '(top level)'}' ~ '{nt or '(top level)'}'" if ns or nt else "top level",
                                   top=not ns and not nt)  # fmt: skip
        return made

    def modules(self) -> int:
        """Free keys whose parent module corresponds (from the pairs so far) to one module on
        the other side: the same leaf name there; the others inside the two modules as in
        :meth:`_match`."""
        mapping: dict[str, set[str]] = defaultdict(set)
        for p in self.pairs.values():
            mapping[_parent(p.source)].add(_parent(p.target))
        children_t: dict[str, list[str]] = defaultdict(list)
        for t in self.free_t:
            children_t[_parent(t)].append(t)
        children_s: dict[str, list[str]] = defaultdict(list)
        for s in self.free_s:
            children_s[_parent(s)].append(s)
        made = 0
        for ps, ss in list(children_s.items()):
            targets = mapping.get(ps)
            if not targets or len(targets) != 1:
                continue
            (pt,) = targets
            detail = f"in '{ps or '(top level)'}' ~ '{pt or '(top level)'}'"
            for s in ss:
                t = (pt + "." if pt else "") + _leaf(s)
                if t in self.free_t:
                    made += self.pair(s, t, "module", detail)
            rest_s = [s for s in ss if s in self.free_s]
            rest_t = [t for t in children_t.get(pt, ()) if t in self.free_t]
            if rest_s and rest_t:
                found = self._match({s: _leaf(s) for s in rest_s}, {t: _leaf(t) for t in rest_t}, inside=bool(ps or pt))
                made += self._pair_all(found, detail)
        return made

    def anchored(self) -> int:
        """Keys that nothing in their own container tells apart, placed by the pairs already
        found beside them (see :meth:`corresponding` and :meth:`numbered`)."""
        return self.corresponding() or self.numbered()

    def _waiting(self) -> tuple[set[str], set[str]]:
        """Source and target keys that name evidence already pairs, shapes apart (see
        :meth:`pair`): placing them by their neighbours' pairs would overrule their names."""
        return {s for s, *_ in self.deferred}, {t for _, t, *_ in self.deferred}

    @functools.cached_property
    def _modules(self) -> tuple[tuple[dict[str, list[str]], dict[str, list[str]]], tuple[dict[str, Shape], dict[str, Shape]]]:
        """Per side, module -> all its keys, and module -> the sorted shapes of those keys."""
        tied = set(self.tied)
        sub = (self._subtrees(self.src), self._subtrees(k for k in self.tgt if k not in tied))
        sig = ({m: tuple(sorted(self.shape_s(k) for k in ks)) for m, ks in sub[0].items()},
               {m: tuple(sorted(self.shape_t(k) for k in ks)) for m, ks in sub[1].items()})  # fmt: skip
        return sub, sig  # type: ignore[return-value]

    def _subtrees(self, keys: Iterable[str]) -> dict[str, list[str]]:
        """Module path (every proper dotted prefix, the root left out) -> the keys under it."""
        out: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            comps = key.split(".")
            for j in range(1, len(comps)):
                out[".".join(comps[:j])].append(key)
        return out

    def corresponding(self) -> int:
        """A module whose keys hold the same shapes as a module on the other side, where every
        pair found so far under either lands under the other (``downsample`` ~ ``shortcut``
        once ``downsample.0.weight`` ~ ``shortcut.convolution.weight``): its free keys are
        paired inside the two as in :meth:`_match`."""
        (sub_s, sub_t), (sig_s, sig_t) = self._modules
        open_s, open_t = self._subtrees(self.free_s), self._subtrees(self.free_t)
        under_s: dict[str, list[Pair]] = defaultdict(list)
        under_t: dict[str, list[Pair]] = defaultdict(list)
        for p in self.pairs.values():
            for m in self._subtrees([p.source]):
                under_s[m].append(p)
            for m in self._subtrees([p.target]):
                under_t[m].append(p)
        candidates = set()
        for p in self.pairs.values():
            ms = [m for m in self._subtrees([p.source]) if m in open_s]
            mt = [m for m in self._subtrees([p.target]) if m in open_t]
            candidates.update((a, b) for a in ms for b in mt if sig_s[a] == sig_t[b])
        wait_s, wait_t = self._waiting()
        made = 0
        for ms, mt in sorted(candidates, key=lambda c: (len(sub_s[c[0]]), c)):
            if not all(p.target.startswith(mt + ".") for p in under_s[ms]) or not all(p.source.startswith(ms + ".") for p in under_t[mt]):
                continue
            rel_s = {k: k[len(ms) + 1 :] for k in sub_s[ms] if k in self.free_s and k not in wait_s}
            rel_t = {k: k[len(mt) + 1 :] for k in sub_t[mt] if k in self.free_t and k not in wait_t}
            if rel_s and rel_t:
                made += self._pair_all(self._match(rel_s, rel_t), f"'{ms}' ~ '{mt}', the pairs inside agree")
        return made

    def numbered(self) -> int:
        """A module numbered like a paired sibling goes where that sibling went: ``bn1``
        beside ``conv1`` -> ``layer.0.convolution`` goes into ``layer.0``, to the one module
        there that holds its shapes; both ways, and only when nothing else claims either."""
        forward = self._numbered_side(self.free_s, self.free_t, self.shape_s, self.shape_t, lambda p: (p.source, p.target))
        backward = self._numbered_side(self.free_t, self.free_s, self.shape_t, self.shape_s, lambda p: (p.target, p.source))
        proposals = forward + [(ms, mt, d) for mt, ms, d in backward]
        count_s = Counter(ms for ms, _ in {(ms, mt) for ms, mt, _ in proposals})
        count_t = Counter(mt for _, mt in {(ms, mt) for ms, mt, _ in proposals})
        wait_s, wait_t = self._waiting()
        made = 0
        for ms, mt, detail in proposals:
            if count_s[ms] != 1 or count_t[mt] != 1:
                continue  # two modules claim one: nothing tells which
            rel_s = {k: _leaf(k) for k in self.free_s if _parent(k) == ms and k not in wait_s}
            rel_t = {k: _leaf(k) for k in self.free_t if _parent(k) == mt and k not in wait_t}
            made += self._pair_all(self._match(rel_s, rel_t), detail)
        return made

    def _numbered_side(self, free_a: Iterable[str], free_b: Iterable[str], shape_a: Any, shape_b: Any,
                       ends: Any) -> list[tuple[str, str, str]]:  # fmt: skip
        """(module on side a, module on side b, detail) for :meth:`numbered`, reading the pairs
        from side a (``ends`` gives a pair's (a key, b key))."""
        went: dict[tuple[str, int], set[str]] = defaultdict(set)  # (parent, number) -> where paired modules so numbered went
        names: dict[tuple[str, int], set[str]] = defaultdict(set)
        for p in self.pairs.values():
            a, b = ends(p)
            m = _parent(a)
            n = self._name_number(m)
            if n is not None:
                went[(_parent(m), n)].add(_parent(_parent(b)))
                names[(_parent(m), n)].add(m)
        mods_a: dict[str, list[str]] = defaultdict(list)
        for k in free_a:
            mods_a[_parent(k)].append(k)
        mods_b: dict[str, list[str]] = defaultdict(list)
        for k in free_b:
            mods_b[_parent(k)].append(k)
        by_parent_b: dict[str, list[str]] = defaultdict(list)
        for m in mods_b:
            by_parent_b[_parent(m)].append(m)
        out = []
        for m, keys in mods_a.items():
            n = self._name_number(m)
            where = went.get((_parent(m), n)) if n is not None else None
            if not where or len(where) != 1 or m in names[(_parent(m), n)]:
                continue
            (home,) = where
            sig = sorted(shape_a(k) for k in keys)
            fits = [mb for mb in by_parent_b.get(home, ()) if sorted(shape_b(k) for k in mods_b[mb]) == sig]
            if len(fits) == 1:
                sibling = sorted(names[(_parent(m), n)])[0]
                out.append((m, fits[0], f"'{m}' numbered like '{sibling}', which went into '{home or '(top level)'}'"))
        return out

    @staticmethod
    def _name_number(module: str) -> int | None:
        """The number a module's own name ends with (``bn1``, ``ln_2``), not an index
        (``downsample.1``: its place in a sequence, not a name)."""
        last = module.rpartition(".")[2]
        if not last or _is_index(last):
            return None
        m = _DIGITS.search(last)
        return int(m.group(1)) if m and m.start() > 0 else None

    def unique_shapes(self) -> int:
        by_s, by_t = self._by_shapes(self.free_s, self.free_t)
        made = 0
        for shape, ss in by_s.items():
            tt = by_t.get(shape, [])
            if len(ss) == 1 and len(tt) == 1:
                made += self.pair(ss[0], tt[0], "shape", f"the only {list(shape)} left on both sides", defer=False)
        return made

    def fused(self) -> int:
        """A fused key whose module name lists its parts in order (``attn.qkv`` ~
        ``attention.q_proj``, ``k_proj``, ``v_proj``; ``mlp.gate_up_proj`` ~ ``gate_proj``,
        ``up_proj``), inside modules that the pairs so far say correspond, and whose shape is
        the parts' joined along one dim: a split (one source key) or a merge (one target key),
        found even when the parts share their shape with a neighbour (``o_proj``). The order
        of the parts is the name's; anything less (two sites fit, a part matches two
        modules, no name lists the parts) stays a candidate for the user (:meth:`regroups`)."""
        made = 0
        for kind in ("split", "merge"):
            if kind == "split":
                ones, many, shape_one, shape_many = list(self.free_s), self.free_t, self.shape_s, self.shape_t
                ends = lambda p: (p.source, p.target)  # noqa: E731
            else:
                ones, many, shape_one, shape_many = list(self.free_t), self.free_s, self.shape_t, self.shape_s
                ends = lambda p: (p.target, p.source)  # noqa: E731
            for one in ones:
                if one not in (self.free_s if kind == "split" else self.free_t):
                    continue
                found = self._fused_parts(one, list(many), shape_one, shape_many, ends)
                if found is None:
                    continue
                parts, dim, detail = found
                if kind == "split":
                    del self.free_s[one]
                    for t in parts:
                        del self.free_t[t]
                    self.named_regroups.append(Regroup("split", (one,), tuple(parts), dim, detail))
                else:
                    del self.free_t[one]
                    for s in parts:
                        del self.free_s[s]
                    self.named_regroups.append(Regroup("merge", tuple(parts), (one,), dim, detail))
                made += 1
        return made

    def _home(self, key: str, ends: Any) -> tuple[str, str] | None:
        """The module on the other side that corresponds to the nearest ancestor of ``key``'s
        module under which pairs were found (their common module, less as many trailing
        components as the pairs' common module lies below the ancestor); None when no pair
        says."""
        comps = _parent(_parent(key)).split(".") if _parent(_parent(key)) else []
        for j in range(len(comps), -1, -1):
            anc = ".".join(comps[:j])
            under = [ends(p) for p in self.pairs.values() if not anc or ends(p)[0].startswith(anc + ".")]
            if not under:
                continue
            common_a = _common_module([a for a, _ in under])
            common_b = _common_module([b for _, b in under])
            extra = len(common_a) - j
            if extra < 0 or extra > len(common_b):
                return None
            return anc, ".".join(common_b[: len(common_b) - extra])
        return None

    def _fused_parts(self, one: str, many: list[str], shape_one: Any, shape_many: Any,
                     ends: Any) -> tuple[list[str], int, str] | None:  # fmt: skip
        """(the parts in the name's order, the dim, detail) for :meth:`fused`, or None."""
        module = _leaf(_parent(one))
        options = _name_parts(module)
        if not options:
            return None
        home = self._home(one, ends)
        if home is None:
            return None
        anc, base = home
        big = shape_one(one)
        sites: dict[str, list[str]] = defaultdict(list)
        for k in many:
            if (not base or k.startswith(base + ".")) and _leaf(k) == _leaf(one) and len(shape_many(k)) == len(big) and _parent(k):
                sites[_parent(_parent(k))].append(k)
        hits = []
        for site, keys in sites.items():
            names = {_leaf(_parent(k)): k for k in keys}
            for parts in options:
                chosen = []
                for part in parts:
                    fits = [n for n in names if n == part or (n.startswith(part) and n not in chosen)]
                    if len(fits) != 1:
                        break
                    chosen.append(fits[0])
                else:
                    if len(set(chosen)) != len(chosen):
                        continue
                    smalls = [shape_many(names[n]) for n in chosen]
                    dims = {d for sm in smalls for d in range(len(big)) if sm[d] != big[d]}
                    if len(dims) == 1:
                        (dim,) = dims
                        if sum(sm[dim] for sm in smalls) == big[dim]:
                            hits.append(([names[n] for n in chosen], dim, parts, chosen))
                    break
        if len(hits) != 1:
            return None
        keys, dim, parts, chosen = hits[0]
        where = f" in '{anc}' ~ '{base}'" if anc or base else ""
        return keys, dim, f"'{module}' names its parts {', '.join(parts)}: {', '.join(chosen)}{where}"

    def structure(self) -> None:
        while self.free_s and self.free_t:
            if self.families() or self.containers() or self.modules() or self.anchored() or self.fused():
                continue
            if not (self.graph() or self.unique_shapes()):
                break

    # ---- 7. graph (an ONNX source)

    def graph(self) -> int:
        """Keys of an ONNX source paired by their role in the graph (see
        :mod:`~remap.diffing.graph_evidence`): per shape a target key would have, and per
        role (family and leaf name; the family only when the target module is known), one
        key on each side, or as many on each side told apart by the order the graph reads
        them against the order the forward pass calls their modules. A shape where a key on
        either side has no known role is left alone: that key could be any of the others."""
        g = self.graph_s
        if g is None or not self.free_s or not self.free_t:
            return 0
        families = self.forward_t.families if self.forward_t is not None else None
        order_t = self.forward_t.order if self.forward_t is not None else {}
        by_s: dict[Shape, list[str]] = defaultdict(list)
        for s in self.free_s:
            role = g.roles.get(s)
            shape = self.shape_s(s)
            by_s[shape[::-1] if role is not None and role.transposed else shape].append(s)
        by_t: dict[Shape, list[str]] = defaultdict(list)
        for t in self.free_t:
            by_t[self.shape_t(t)].append(t)
        made = 0
        for shape, ss in by_s.items():
            tt = by_t.get(shape)
            if not tt or any(g.roles.get(s) is None for s in ss):
                continue
            if families is not None and any(families.get(t) is None for t in tt):
                continue  # a key of a module whose parameters have no known role could take any of them
            groups_s: dict[tuple[str | None, str], list[str]] = defaultdict(list)
            groups_t: dict[tuple[str | None, str], list[str]] = defaultdict(list)
            for s in ss:
                role = g.roles[s]
                if role is not None:  # every one has a role (checked above)
                    groups_s[(role.family if families is not None else None, role.leaf)].append(s)
            for t in tt:
                groups_t[(families.get(t) if families is not None else None, _leaf(t))].append(t)
            for kind, group_s in groups_s.items():
                made += self._graph_group(group_s, groups_t.get(kind, []), shape, g, order_t)
        return made

    def _graph_group(self, ss: list[str], tt: list[str], shape: Shape, g: GraphEvidence, order_t: Mapping[str, int]) -> int:
        """Pair one role's keys of one shape: one on each side, or by order (see :meth:`graph`)."""
        if not tt or len(ss) != len(tt):
            return 0
        first = g.roles[ss[0]]
        if first is None:
            return 0
        what = f"{first.what()} {list(shape)}"
        if len(ss) == 1:
            detail = f"the only {what} left in the graph ({first.describe()}) and the only one left in the target"
            return self._graph_pair(ss[0], tt[0], detail)
        if any(t not in order_t for t in tt) or len({order_t[t] for t in tt}) != len(tt) or any(s not in g.order for s in ss):
            return 0  # the forward pass did not say where each one runs: a choice
        made = 0
        n = len(ss)
        for k, (s, t) in enumerate(zip(sorted(ss, key=g.order.__getitem__), sorted(tt, key=order_t.__getitem__)), 1):
            role = g.roles[s] or first
            detail = f"{_ordinal(k)} of {n} {what} in the graph's order ({role.describe()}) and in the target's forward pass"
            made += self._graph_pair(s, t, detail)
        return made

    def _graph_pair(self, s: str, t: str, detail: str) -> int:
        role = self.graph_s.roles.get(s) if self.graph_s is not None else None
        ss, ts = self.shape_s(s), self.shape_t(t)
        conflict = None
        if role is not None and role.transposed and ss == ts:
            conflict = Conflict(ss, ts, (f"transpose ({role.op} stores it as (in, out), torch as (out, in))",), "transpose")
        return int(self.pair(s, t, "graph", detail, defer=False, conflict=conflict))

    def hold_folded(self) -> None:
        """Target keys of modules the graph has no node for (folded by the exporter): left
        undeclared by a draft, with a note (see :func:`~remap.diffing.graph_evidence.missing_families`)."""
        from .graph_evidence import missing_families

        if self.graph_s is None or self.forward_t is None:
            return
        held: list[str] = []
        for note, modules, none in missing_families(self.graph_s, self.forward_t):
            mods = set(modules)
            keys = [t for t in self.free_t if _parent(t) in mods]
            if keys:
                held += keys
                self.graph_notes.append(note)
                if none:  # no node reads any of them: no source key is theirs, by any evidence
                    self.unpairable.update(keys)
        self.held = tuple(held)
        for t in self.unpairable:
            del self.free_t[t]

    def square_transposed_notes(self, pairs: Sequence[Pair]) -> list[str]:
        """Keys an ONNX graph reads as (in, out) that other evidence paired as they are with a
        square target: the shape cannot say whether they need a transpose."""
        g = self.graph_s
        if g is None:
            return []
        keys = []
        for p in pairs:
            role = g.roles.get(p.source)
            square = len(p.source_shape) == 2 and p.source_shape[0] == p.source_shape[1] > 1
            if p.evidence != "graph" and p.conflict is None and role is not None and role.transposed and square:
                keys.append(p.source)
        if not keys:
            return []
        shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        return [f"{shown}: the ONNX graph reads {len(keys)} square weight{'' if len(keys) == 1 else 's'} as (in, out) that "
                "names or shape paired as stored; a torch Linear weight is (out, in): check whether a transpose is needed"]

    # ---- the rest

    def finish(self) -> tuple[tuple[Choice, ...], tuple[str, ...], tuple[str, ...]]:
        for s, t, evidence, detail in self.deferred:
            self.pair(s, t, evidence, detail, defer=False)
        by_s, by_t = self._by_shapes(self.free_s, self.free_t)
        choices = []
        chosen_s: set[str] = set()
        chosen_t: set[str] = set()
        for shape, ss in by_s.items():
            tt = by_t.get(shape)
            if not tt:
                continue
            reason = (f"{len(ss)} source and {len(tt)} target key(s) of shape {list(shape)}; "
                      "names and structure do not tell them apart")  # fmt: skip
            choices.append(Choice(shape, tuple(ss), tuple(tt), reason))
            chosen_s.update(ss)
            chosen_t.update(tt)
        source_only = tuple(s for s in self.free_s if s not in chosen_s)
        target_only = tuple(t for t in self.tgt if (t in self.free_t and t not in chosen_t) or t in self.unpairable)
        return tuple(choices), source_only, target_only

    def run(self) -> Alignment:
        self.exact()
        self.prefix()
        self.suffix()
        self.offset()
        self.hold_folded()
        self.graph()
        self.structure()
        choices, source_only, target_only = self.finish()
        pairs = tuple(sorted(self.pairs.values(), key=lambda p: self.order_s[p.source]))
        made = Counter(p.detail for p in pairs if p.evidence == "prefix")  # with the pairs whose shapes differ
        self.prefixes = sorted((PrefixChange(c.strip, c.add, made[c.describe()]) for c in self.prefixes), key=lambda c: -c.keys)
        notes = (*self.graph_notes, *self.square_transposed_notes(pairs), *_square_notes(pairs))
        unpaired = {*target_only, *(t for c in choices for t in c.targets)}
        held = tuple(t for t in self.held if t in unpaired)
        regroups = (*self.named_regroups, *self.regroups(source_only, target_only))
        return Alignment(self.src, self.tgt, pairs, choices, source_only, target_only, tuple(self.prefixes), self.tied,
                         notes=notes, regroups=regroups, held=held)  # fmt: skip

    def regroups(self, source_only: Sequence[str], target_only: Sequence[str]) -> tuple[Regroup, ...]:
        """One leftover key whose shape is k (2 to 4) same-shaped leftover keys of sibling
        modules on the other side, joined along one dim (``attn.{q,k,v}_proj.weight`` ~
        ``attn.in_proj_weight``): each a candidate for a merge or a split."""
        out = []
        for kind, singles, many, shape_one, shape_many in (
            ("merge", target_only, source_only, self.shape_t, self.shape_s),
            ("split", source_only, target_only, self.shape_s, self.shape_t),
        ):
            sites: dict[tuple[str, str, Shape], list[str]] = defaultdict(list)
            for k in many:
                name = self.normalise(k) if kind == "merge" else k
                sites[(_parent(_parent(name)), _leaf(name), shape_many(k))].append(k)
            for one in singles:
                name = one if kind == "merge" else self.normalise(one)
                big = shape_one(one)
                found = []
                for (site, leaf, small), keys in sites.items():
                    if not 2 <= len(keys) <= _MAX_PARTS or len(small) != len(big) or site not in (_parent(name), _parent(_parent(name))):
                        continue
                    if not _leaf(name).endswith(leaf):
                        continue
                    dims = [d for d in range(len(big)) if big[d] != small[d]]
                    if len(dims) == 1 and big[dims[0]] == small[dims[0]] * len(keys):
                        found.append((keys, dims[0]))
                if len(found) == 1:
                    keys, dim = found[0]
                    many_sorted = tuple(sorted(keys, key=(self.order_s if kind == "merge" else self.order_t).__getitem__))
                    out.append(Regroup(kind, many_sorted, (one,), dim) if kind == "merge" else Regroup(kind, (one,), many_sorted, dim))
        return tuple(out)


def align(source: Mapping[str, Any], target: Mapping[str, Any], *, source_description: Mapping[str, Any] | None = None,
          target_description: Mapping[str, Any] | None = None, graph: GraphEvidence | None = None,
          forward: ForwardEvidence | None = None) -> Alignment:  # fmt: skip
    """Align ``source`` (key -> shape | (shape, dtype) | TensorMeta | tensor) with ``target``
    (the same, :class:`~remap.meta.TargetMeta`, or a module). Pure: reads names, shapes and
    dtypes only, and, for an ONNX source, the ``graph`` evidence (roles and read order of its
    initializers) against the target's ``forward`` evidence (its modules' kinds and call
    order), both gathered by :func:`diff`.

    >>> a = align({"foo.weight": [8, 8]}, {"bar.weight": [8, 8], "baz.weight": [8, 8]})
    >>> a.pairs, a.choices[0].targets
    ((), ('bar.weight', 'baz.weight'))
    """
    src = source_meta(source)
    if hasattr(target, "named_parameters") and hasattr(target, "state_dict"):
        from ..meta import target_meta_of_module

        target = target_meta_of_module(target)
    tgt = target if all(isinstance(v, TargetMeta) for v in target.values()) else target_meta(target)
    result = _Aligner(src, dict(tgt), graph, forward).run()
    return Alignment(result.source, result.target, result.pairs, result.choices, result.source_only, result.target_only,
                     result.prefixes, result.tied, dict(source_description or {}), dict(target_description or {}),
                     result.notes, result.regroups, result.held)  # fmt: skip


def _ordinal(n: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``11th``, ``22nd``."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _square_notes(pairs: Sequence[Pair]) -> tuple[str, ...]:
    """Square matrices paired as they are while keys of the same leaf name need a transpose:
    their shape cannot say whether they need one too."""
    flipped = {_leaf(p.target) for p in pairs if p.conflict is not None and p.conflict.fix == "transpose"}
    square = [p.source for p in pairs if p.conflict is None and len(p.source_shape) == 2 and p.source_shape[0] == p.source_shape[1]
              and p.source_shape[0] > 1 and _leaf(p.target) in flipped]  # fmt: skip
    if not square:
        return ()
    from ..report.grouping import group_keys

    return (f"{len(square)} square matri{'x' if len(square) == 1 else 'ces'} paired as {'it is' if len(square) == 1 else 'they are'} "
            f"({', '.join(group_keys(square)[:3])}{', ...' if len(group_keys(square)) > 3 else ''}) while other "
            f"'{sorted(flipped)[0]}' keys need a transpose: a square shape cannot tell; check whether they need one too",)  # fmt: skip


# --------------------------------------------------------------------------- from paths and factories


def _is_factory_spec(text: str) -> bool:
    from ..sources.factories import _SPEC_RE

    return bool(_SPEC_RE.match(text.strip()))


def diff(
    source: Any,
    target: Any,
    *,
    source_key: str | None = None,
    trust_pickle: bool = False,
    trust_links: bool = False,
    target_args: Sequence[Any] = (),
    target_kwargs: Mapping[str, Any] | None = None,
) -> Alignment:
    """Open ``source`` (a checkpoint path, a factory spec, a state_dict or a mapping of key
    -> shape) and ``target`` (a checkpoint path, a ``"module.path:callable"`` factory built
    on the meta device, a module, or a mapping) and :func:`align` them. Reads metadata only.
    When the source is an ONNX model and the target a module (or a factory), the module is
    run once, without gradients and in eval mode (put back after), on zero input of the
    graph's input shapes (meta tensors when the module is on the meta device), to learn the
    order its modules are called in (:func:`~remap.diffing.graph_evidence.forward_evidence`).

    Unreadable sources raise :class:`~remap.errors.SourceError`; unbuildable or unreadable
    targets :class:`~remap.errors.TargetError` (both exit code 3).
    """
    import os
    from pathlib import Path

    from ..errors import SourceError, TargetError
    from ..sources.readers import open_source

    with open_source(source, key=source_key, trust_pickle=trust_pickle, trust_links=trust_links) as src:
        smeta = dict(src.meta)
        sdesc = _describe_source(source, src.description, source_key)
        if trust_pickle:
            sdesc["trust_pickle"] = True
        graph = _graph_of(src)
    tdesc: dict[str, Any]
    module: Any = None
    if isinstance(target, (str, os.PathLike)) and not (isinstance(target, str) and _is_factory_spec(target) and not Path(target).exists()):
        try:
            with open_source(target, trust_pickle=trust_pickle, trust_links=trust_links) as t:
                tmeta = {k: TargetMeta(m.shape, m.dtype) for k, m in t.meta.items()}
        except SourceError as exc:
            raise TargetError(exc.message, where=f"target {exc.where}" if exc.where else "target") from None
        tdesc = {"kind": "checkpoint", "path": str(target), "text": str(target)}
    elif isinstance(target, str):
        from ..sources.factories import build, describe_call
        from ..meta import target_meta_of_module

        notes = []
        try:
            module = build(target, list(target_args), dict(target_kwargs or {}), what="target", device="meta")
        except TargetError as exc:  # some factories cannot run on the meta device: build for real
            if exc.__cause__ is None:  # not the factory's own failure (a bad spec, an import): building again cannot help
                raise
            module = build(target, list(target_args), dict(target_kwargs or {}), what="target")
            notes.append(f"built for real: it failed on the meta device ({exc.message})")
        if not hasattr(module, "state_dict"):
            raise TargetError(f"{target!r} returned a {type(module).__name__}, expected a torch.nn.Module", where="target")
        tmeta = target_meta_of_module(module)
        text = describe_call(target, target_args, target_kwargs) if (target_args or target_kwargs) else target
        tdesc = {"kind": "factory", "model": target, "args": list(target_args), "kwargs": dict(target_kwargs or {}), "text": text}
        if notes:
            tdesc["notes"] = notes
    elif hasattr(target, "state_dict") and hasattr(target, "named_parameters"):
        from ..meta import target_meta_of_module

        module = target
        tmeta = target_meta_of_module(target)
        tdesc = {"kind": "module", "class": type(target).__name__, "text": type(target).__name__}
    elif isinstance(target, Mapping):
        tmeta = target_meta({k: getattr(v, "shape", v) for k, v in target.items()})
        tdesc = {"kind": "metadata", "text": f"{len(tmeta)} keys"}
    else:
        raise TargetError(f"expected a checkpoint path, a 'module.path:callable' factory, a module or a mapping; found {type(target).__name__}")
    forward = None
    if graph is not None and module is not None:
        from .graph_evidence import forward_evidence

        forward = forward_evidence(module, [k for k, m in tmeta.items() if m.tied_to is None], graph)
        tdesc.setdefault("notes", []).extend(forward.notes)
    return align(smeta, tmeta, source_description=sdesc, target_description=tdesc, graph=graph, forward=forward)


def _graph_of(src: Any) -> GraphEvidence | None:
    """The graph evidence of a source that is one ONNX model, else None."""
    if src.description.get("format") != "onnx":
        return None
    from ..sources.onnx_reader import OnnxReader
    from .graph_evidence import graph_evidence

    readers = {id(r): r for r in getattr(src, "_owner", {}).values()}  # a file source's readers (sources.readers._FileSource)
    onnx = [r for r in readers.values() if isinstance(r, OnnxReader)]
    return graph_evidence(onnx[0]) if len(onnx) == 1 and len(readers) == 1 else None


def _describe_source(source: Any, description: Mapping[str, Any], key: str | None) -> dict[str, Any]:
    """What was opened, for the table's header and the written rules' ``source`` section."""
    import os

    if description.get("kind") == "factory":
        return {"kind": "factory", "model": description.get("factory"), "text": str(description.get("factory"))}
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        detected = description.get("key") if description.get("key_detected") else None
        return {"kind": "checkpoint", "path": path, "abspath": os.path.abspath(path), "key": key,
                "detected_key": detected, "text": path}  # fmt: skip
    return {"kind": str(description.get("kind") or "state_dict"), "text": f"a {description.get('kind') or 'state_dict'}"}
