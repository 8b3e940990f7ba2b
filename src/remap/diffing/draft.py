"""Drafting a rules file from an :class:`~remap.diffing.alignment.Alignment`: the smallest rules that
reproduce its unambiguous part, for a person to review.

What goes in, in pipeline order:

1. ``drop`` — source keys that reach no target on evidence (a shape conflict no op
   certainly fixes, or a leftover whose shape no leftover target key could take), as few
   regexes as cover them and nothing else;
2. ``strip_prefix`` / ``add_prefix`` — when one prefix change explains most renames;
3. ``rename`` — one mapping, one line per *family* of keys, indices captured
   (``'^blocks\\.(\\d+)\\.attn\\.qkv\\.': 'encoder.layers.encoder_layer_\\1.self_attention.in_proj_'``),
   the common tail of the names left to the key; an index offset is written in the
   mapping form ``{to, add}``, and digits glued to a name count as an index when that
   makes one rule of several stages (``'^layer(\\d+)\\.(\\d+)\\.conv(\\d+)\\.':
   {to: 'stages.\\1.layers.\\2.layer.\\3.convolution.', add: {1: -1, 3: -1}}``);
4. ``split`` / ``merge`` — a fused key whose name lists its parts in order (``qkv`` ~
   ``q_proj``, ``k_proj``, ``v_proj``: see :meth:`remap.diffing.alignment._Aligner.fused`),
   one step per family, the leaf captured (``(bias|weight)``), ``sizes`` when the parts
   differ (grouped-query attention); a candidate whose order no name gives stays a comment;
5. ``transpose`` / ``reshape`` — shapes that are reversed, or differ only in size-1 dims;
6. ``expect.missing`` — target keys nothing loads, on the same evidence.

Where layers were picked (more instances of a block family in the source than in the
target, all alike, the extra ones left over), which ones the target takes is not in names
or shapes: the draft writes commented ``map`` choices (the first N, the last N, evenly
spaced) and leaves the family undeclared, never the pick that same names would make.

What it cannot pair it never declares (see :func:`_undeclared`): ambiguous keys, leftovers
that a leftover of a related shape could feed, and every key when nothing pairs at all stay
out of ``drop`` and ``expect``, so that ``remap apply`` fails and names them until a person
decides; each ambiguous key gets a commented-out rename to uncomment.

Every regex is checked against every key before it is written: a rule that would catch a
key of another family is first put after that family's rule, else narrowed (its indices
listed, then the whole name anchored, then one key per line) until the steps, run over
the source keys exactly as the planner runs them, give every key its target. The result is then planned with :func:`remap.planning.planner.make_plan`
(names and shapes only) and must load every paired key, or this is a bug.

Nothing is guessed: ambiguous keys get no rename, only a commented-out one that shows the choice.

>>> from remap.diffing.alignment import align
>>> draft = draft_rules(align({"module.fc.weight": [2, 4], "module.fc.bias": [2]}, {"fc.weight": [2, 4], "fc.bias": [2]}))
>>> draft.rules["rules"]
[{'strip_prefix': 'module.'}]
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .alignment import EVIDENCE, Alignment, Pair, candidate_ops, tokens as index_tokens
from ..report.grouping import printable

__all__ = ["DraftRules", "draft_rules", "write_draft", "cover", "escape"]

_SPECIAL = set(".^$*+?{}[]\\|()")
_FIXES = ("transpose", "permute", "reshape")
_WORD = re.compile(r"^[a-z_]+$")  # a step's field name: written unquoted in flow style
EVIDENCE_NOTES = {
    "exact": "same name",
    "prefix": "prefix",
    "suffix": "common suffix",
    "offset": "index offset",
    "structure": "by structure and shape",
    "module": "same name in the module",
    "graph": "by role and shape in the ONNX graph",
    "shape": "by shape alone: check it",
}


def escape(text: str) -> str:
    """A literal for a regex, escaping only what regexes treat specially (``_`` and ``-`` stay).

    >>> escape("blocks.0.attn_proj")
    'blocks\\\\.0\\\\.attn_proj'
    """
    return "".join("\\" + c if c in _SPECIAL else c for c in text)


def _n(n: int, word: str) -> str:
    """``_n(1, "key")`` -> ``1 key``; ``_n(2, "key")`` -> ``2 keys``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def _q(text: str) -> str:
    """A YAML single-quoted scalar (backslashes stay as they are)."""
    return "'" + text.replace("'", "''") + "'"


# --------------------------------------------------------------------------- covering key sets


def cover(selected: Iterable[str], universe: Iterable[str], *, subtrees: bool = True) -> list[tuple[str, tuple[str, ...]]]:
    """Few regexes that match every ``selected`` key and no other key of ``universe``,
    each with the keys it stands for. A module whose keys are all selected is one
    ``'^module\\.'``; leaves of one module are ``'^m\\.(?:bias|weight)$'``; modules or keys
    that differ only in an index fold into ``\\d+`` when no other key matches.

    >>> cover(["head.weight", "head.bias"], ["head.weight", "head.bias", "fc.weight"])
    [('^head\\\\.', ('head.weight', 'head.bias'))]
    >>> [r for r, _ in cover(["b.0.x", "b.1.x"], ["b.0.x", "b.1.x", "b.0.y", "b.1.y"])]
    ['^b\\\\.\\\\d+\\\\.x$']
    """
    sel = list(dict.fromkeys(selected))
    if not sel:
        return []
    chosen = set(sel)
    everything = list(dict.fromkeys([*universe, *sel]))
    total: Counter[str] = Counter()
    picked: Counter[str] = Counter()
    if subtrees:
        for key in everything:
            comps = key.split(".")
            for j in range(1, len(comps)):
                total[".".join(comps[:j])] += 1
        for key in sel:
            comps = key.split(".")
            for j in range(1, len(comps)):
                picked[".".join(comps[:j])] += 1
    # units: (head, leaves): a subtree when leaves is None, else these leaves of module `head`
    units: dict[tuple[str, bool], list[str]] = {}
    for key in sel:
        comps = key.split(".")
        head = None
        for j in range(1, len(comps)):
            p = ".".join(comps[:j])
            if subtrees and total[p] == picked[p]:
                head = p
                break
        if head is not None:
            units.setdefault((head, True), []).append(key)
        else:
            units.setdefault((key.rpartition(".")[0], False), []).append(key)
    # leaf units: one regex per module, its leaves listed; then fold indices
    shaped: dict[tuple[Any, ...], list[tuple[str, bool, tuple[str, ...]]]] = defaultdict(list)
    members: dict[tuple[str, bool, tuple[str, ...]], list[str]] = {}
    for (head, subtree), keys in units.items():
        leaves = () if subtree else tuple(sorted({k.rpartition(".")[2] for k in keys}))
        unit = (head, subtree, leaves)
        members[unit] = keys
        tokens = index_tokens(head) if head else []
        skel = tuple(t if not idx else None for t, idx in tokens)
        shaped[(skel, subtree, leaves)].append(unit)
    out: list[tuple[str, tuple[str, ...]]] = []
    others = [k for k in everything if k not in chosen]
    for (skel, subtree, leaves), group in shaped.items():
        keys = [k for u in group for k in members[u]]
        if len(group) > 1:
            folded = _unit_regex(group[0][0], subtree, leaves, [u[0] for u in group], fold=True)
            if not _matches_any(folded, others):
                out.append((folded, tuple(keys)))
                continue
        for unit in group:
            out.append((_unit_regex(unit[0], subtree, leaves, [unit[0]], fold=False), tuple(members[unit])))
    order = {k: i for i, k in enumerate(sel)}
    out.sort(key=lambda r: min(order[k] for k in r[1]))
    return out


def _unit_regex(head: str, subtree: bool, leaves: tuple[str, ...], heads: Sequence[str], *, fold: bool) -> str:
    if head:
        if fold:
            tokens = [index_tokens(h) for h in heads]
            parts = []
            for n, (text, idx) in enumerate(tokens[0]):
                if idx and len({t[n][0] for t in tokens}) > 1:
                    parts.append(r"\d+")
                else:
                    parts.append(escape(text))
            body = "".join(parts)
        else:
            body = escape(head)
        if subtree:
            return f"^{body}\\."
        body += "\\."
    else:
        body = ""
    names = [escape(leaf) for leaf in leaves]
    return f"^{body}{names[0]}$" if len(names) == 1 else f"^{body}(?:{'|'.join(names)})$"


def _matches_any(pattern: str, keys: Iterable[str]) -> bool:
    from ..rules.patterns import compile_regex

    compiled = compile_regex(pattern)
    return any(compiled.search(k) for k in keys)


# --------------------------------------------------------------------------- renames

# An element of a name: ("c", char) literal, ("cap", j) the source's j-th index,
# ("any",) an index matched but not kept, ("ref", j, add) the target's copy of index j.
Elem = tuple[Any, ...]


@dataclass
class _Group:
    """Pairs whose names have the same skeleton (indices abstracted), and how the target's
    indices follow from the source's."""

    rows: list[tuple[str, str, Pair]]  # (source name at the rename step, target, pair)
    s_elems: list[Elem]
    t_elems: list[Elem]
    s_values: list[list[int]]  # per row: the source's index values
    level: int = 0  # 0: head, any index; 1: head, indices listed; 2: whole name; 3: whole name, indices listed; 4: one rule per key
    depth: int = 0  # at levels 0 and 1: how many shorter common tails were passed over (a longer head, e.g. '^blocks\.(\d+)\.mlp\.')

    def deepen(self) -> None:
        """Narrow the rule one notch: a longer head while the names have one, else the next level."""
        if self.level < 2 and self._tails(self.depth + 1) is not None:
            self.depth += 1
        else:
            self.level, self.depth = min(self.level + 1, 4), 0

    def head(self) -> tuple[list[Elem], list[Elem], bool]:
        """The shortest head of each name that the rename must rewrite: the longest common
        tail that starts after a '.' or '_' on both sides is left to the key (at ``depth``
        d, the d-th shorter such tail: a longer head)."""
        found = self._tails(self.depth) if self.level < 2 else None
        if found is None:
            return self.s_elems, self.t_elems, True
        ks, kt = found
        return self.s_elems[:ks], self.t_elems[:kt], False

    def _tails(self, depth: int) -> tuple[int, int] | None:
        """Where the ``depth``-th longest usable common tail starts in each name, or None."""
        seen = 0
        s, t = self.s_elems, self.t_elems
        n = 0
        while n < min(len(s), len(t)) and _same(s[-1 - n], t[-1 - n]):
            n += 1
        dot, under = ("c", "."), ("c", "_")
        # the tail starts a dotted component on both sides (or is the whole target name);
        # failing that, a component of the source and an '_'-part of the target (qkv.weight -> in_proj_weight)
        tried: set[tuple[int, int]] = set()
        for ends in ((dot,), (dot, under)):
            for length in range(n, 0, -1):
                ks, kt = len(s) - length, len(t) - length
                if ks == 0 or s[ks - 1] != dot or (kt and t[kt - 1] not in ends) or (ks, kt) in tried:
                    continue
                head_caps = {e[1] for e in s[:ks] if e[0] == "cap"}
                if any(e[0] == "ref" and e[1] not in head_caps for e in t[:kt]):
                    continue
                tried.add((ks, kt))
                if seen == depth:
                    return ks, kt
                seen += 1
        return None


def _same(a: Elem, b: Elem) -> bool:
    if a[0] == "c" and b[0] == "c":
        return a[1] == b[1]
    return a[0] == "cap" and b[0] == "ref" and a[1] == b[1] and b[2] == 0


def _elements(tokens: Sequence[tuple[str, bool]], spec: dict[int, Elem]) -> list[Elem]:
    out: list[Elem] = []
    n = 0
    for text, idx in tokens:
        if idx:
            e = spec.get(n)
            out.extend([e] if e is not None else [("c", ch) for ch in text])
            n += 1
        else:
            out.extend(("c", ch) for ch in text)
    return out


def _groups(rows: list[tuple[str, str, Pair]]) -> list[_Group]:
    """Group renames by skeleton, then work out which target index copies which source index
    (with a constant offset); a target index that follows none splits the group."""
    by_skel: dict[tuple[Any, ...], list[tuple[str, str, Pair]]] = defaultdict(list)
    for s, t, p in rows:
        ts, tt = index_tokens(s), index_tokens(t)
        skel = (tuple(x if not i else None for x, i in ts), tuple(x if not i else None for x, i in tt))
        by_skel[skel].append((s, t, p))
    out: list[_Group] = []
    for members in by_skel.values():
        out.extend(_solve(members))
    return _fold_glued(out)


_GLUED = re.compile(r"^(.*[^0-9_])(0|[1-9][0-9]*)$")


def _loose_tokens(key: str) -> list[tuple[str, bool]]:
    """:func:`~remap.diffing.alignment.index_tokens`, also reading digits glued to a name
    as an index (``layer2`` -> ``layer``, ``2``), as a person writing ``layer(\\d+)`` does."""
    out: list[tuple[str, bool]] = []
    for text, idx in index_tokens(key):
        if idx:
            out.append((text, True))
            continue
        comps = text.split(".")
        for n, comp in enumerate(comps):
            m = _GLUED.match(comp)
            piece = [(m.group(1), False), (m.group(2), True)] if m else [(comp, False)]
            if n:
                piece[0] = ("." + piece[0][0], False)
            for t, i in piece:
                if out and not out[-1][1] and not i:
                    out[-1] = (out[-1][0] + t, False)
                elif t:
                    out.append((t, i))
    return out


def _fold_glued(groups: list[_Group]) -> list[_Group]:
    """Groups that differ only in digits glued to names (``layer2.#.conv1`` ->
    ``stages.1.layers.#.layer.0``, ``layer3.#.conv2`` -> ``stages.2.layers.#.layer.1``) become
    one, with index arithmetic, when one offset per index explains every row: one rule
    instead of one per stage. Only where arithmetic is needed: ``norm1``, ``norm2`` ->
    ``ln_1``, ``ln_2`` stay two plain lines."""
    buckets: dict[tuple[Any, ...], list[_Group]] = defaultdict(list)
    for g in groups:
        s, t, _ = g.rows[0]
        skel = tuple(x if not i else None for x, i in _loose_tokens(s)), tuple(x if not i else None for x, i in _loose_tokens(t))
        buckets[skel].append(g)
    out: list[_Group] = []
    for members in buckets.values():
        if len(members) > 1:
            solved = _solve([row for g in members for row in g.rows], _loose_tokens)
            if len(solved) == 1 and not solved[0].level and any(e[0] == "ref" and e[2] for e in solved[0].t_elems):
                out.append(solved[0])
                continue
        out.extend(members)
    return out


def _solve(rows: list[tuple[str, str, Pair]], tokenize: Any = index_tokens) -> list[_Group]:
    ts = [tokenize(s) for s, _, _ in rows]
    tt = [tokenize(t) for _, t, _ in rows]
    sv = [[int(x) for x, i in toks if i] for toks in ts]
    tv = [[int(x) for x, i in toks if i] for toks in tt]
    ns, nt = len(sv[0]), len(tv[0])
    varies_s = [len({v[j] for v in sv}) > 1 for j in range(ns)]
    t_spec: dict[int, Elem] = {}
    used: set[int] = set()
    for i in range(nt):
        values = {v[i] for v in tv}
        if len(values) == 1:
            continue  # the same in every row: written as it is
        candidates = []
        for j in range(ns):
            if varies_s[j]:
                deltas = {b[i] - a[j] for a, b in zip(sv, tv)}
                if len(deltas) == 1:
                    c = deltas.pop()
                    candidates.append((c != 0, j != i, abs(c), j, c))
        if not candidates:  # no source index explains it: one group per value
            parts: dict[int, list[tuple[str, str, Pair]]] = defaultdict(list)
            for row, v in zip(rows, tv):
                parts[v[i]].append(row)
            return [g for part in parts.values() for g in _solve(part, tokenize)]
        _, _, _, j, c = min(candidates)
        t_spec[i] = ("ref", j, c)
        used.add(j)
    s_spec = {j: ("cap", j) if j in used else ("any",) for j in range(ns) if varies_s[j]}
    refs = Counter(e[1] for e in t_spec.values())
    if any(n > 1 and len({e[2] for e in t_spec.values() if e[1] == j}) > 1 for j, n in refs.items()):
        return [_Group([row], _elements(a, {}), _elements(b, {}), [v], level=4) for row, a, b, v in zip(rows, ts, tt, sv)]
    return [_Group(rows, _elements(ts[0], s_spec), _elements(tt[0], t_spec), sv)]


@dataclass
class _Rule:
    """One rename: regex, replacement, index arithmetic, and the pairs it is for."""

    pattern: str
    template: str
    add: dict[int, int]
    rows: list[tuple[str, str, Pair]]
    groups: list[_Group] = field(default_factory=list)

    @property
    def sources(self) -> set[str]:
        return {s for s, _, _ in self.rows}


def _render(group: _Group, s: list[Elem], t: list[Elem], whole: bool, *, listed: bool) -> tuple[str, str, dict[int, int]]:
    numbers: dict[int, int] = {}
    parts: list[str] = []
    text = ""
    for e in s:
        if e[0] == "c":
            text += e[1]
            continue
        parts.append(escape(text))
        text = ""
        if listed:
            values = sorted({v[e[1]] for v in group.s_values})
            alt = "|".join(map(str, values))
        else:
            alt = r"\d+"
        if e[0] == "cap":
            numbers[e[1]] = len(numbers) + 1
            parts.append(f"({alt})")
        else:
            parts.append(f"(?:{alt})" if listed else alt)
    parts.append(escape(text))
    pattern = "^" + "".join(parts) + ("$" if whole else "")
    out = ""
    add: dict[int, int] = {}
    for n, e in enumerate(t):
        if e[0] == "c":
            out += e[1]
            continue
        g = numbers[e[1]]
        nxt = t[n + 1] if n + 1 < len(t) else None
        out += f"\\g<{g}>" if nxt is not None and nxt[0] == "c" and nxt[1].isdigit() else f"\\{g}"
        if e[2]:
            add[g] = e[2]
    return pattern, out, add


def _rules(groups: list[_Group]) -> list[_Rule]:
    """Concrete rules from groups at their levels; rules that come out the same merge."""
    merged: dict[tuple[str, str, tuple[tuple[int, int], ...]], _Rule] = {}
    out: list[_Rule] = []
    for g in groups:
        if g.level >= 4:
            for row in g.rows:
                out.append(_Rule(f"^{escape(row[0])}$", row[1], {}, [row], [g]))
            continue
        s, t, whole = g.head()
        pattern, template, add = _render(g, s, t, whole, listed=g.level in (1, 3))
        key = (pattern, template, tuple(sorted(add.items())))
        if key in merged:
            merged[key].rows.extend(g.rows)
            merged[key].groups.append(g)
            continue
        rule = merged[key] = _Rule(pattern, template, add, list(g.rows), [g])
        out.append(rule)
    return out


# --------------------------------------------------------------------------- the draft


@dataclass(frozen=True)
class DraftRules:
    """A drafted rules file: ``rules`` (a dict :func:`remap.rules.parse.parse_rules` accepts),
    ``text`` (the YAML to write, with comments), and what it does."""

    rules: dict[str, Any]
    text: str
    loaded: int
    renames: int
    dropped: tuple[str, ...]
    missing: tuple[str, ...]
    ambiguous: int
    conflicts: int
    open_sources: tuple[str, ...] = ()  # left undeclared: `remap apply` fails and lists them until a person decides
    open_targets: tuple[str, ...] = ()

    def summary(self) -> str:
        """``11 rename rules; loads 32 of 32 target keys; drops 0 source keys; 0 target keys keep their initial values``,
        and when keys are left undeclared ``; 2 source and 2 target keys left for you to decide: remap apply fails until you do``"""
        total = self.loaded + len(self.missing) + len(self.open_targets)
        keeps = "keeps" if len(self.missing) == 1 else "keep"
        text = (f"{_n(self.renames, 'rename rule')}; loads {self.loaded} of {total} target keys; drops {_n(len(self.dropped), 'source key')}; "
                f"{_n(len(self.missing), 'target key')} {keeps} their initial values")  # fmt: skip
        if self.open_sources or self.open_targets:
            text += f"; {_open_counts(len(self.open_sources), len(self.open_targets))} left for you to decide: remap apply fails until you do"
        return text


def _open_counts(n_s: int, n_t: int) -> str:
    """``2 source and 1 target key``, ``3 source keys``, ``1 target key``."""
    if n_s and n_t:
        return f"{n_s} source and {_n(n_t, 'target key')}"
    return _n(n_s, "source key") if n_s else _n(n_t, "target key")


@dataclass
class _Plan:
    """The steps being drafted, each with the comment lines that go with it."""

    drop: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    prefix: dict[str, Any] | None = None
    rules: list[_Rule] = field(default_factory=list)
    ops: list[tuple[str, Any, int, str]] = field(default_factory=list)  # (step kind, value, keys, why)
    regroups: list[tuple[str, Any, int, str]] = field(default_factory=list)  # split/merge: (kind, value, keys, why)

    def steps(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.drop:
            out.append({"drop": [r for r, _ in self.drop]})
        if self.prefix:
            out.append(dict(self.prefix))
        mapping: dict[str, Any] = {r.pattern: {"to": r.template, "add": dict(r.add)} if r.add else r.template for r in self.rules}
        if mapping:  # one step: each key takes the first pattern found in it, index arithmetic in the mapping form
            out.append({"rename": mapping})
        for kind, value, _, _ in (*self.regroups, *self.ops):
            out.append({kind: value})
        return out


def _strip_all(key: str, prefix: str) -> str:
    while key.startswith(prefix) and len(key) > len(prefix):
        key = key[len(prefix) :]
    return key


def _choose_prefix(alignment: Alignment, kept: list[Pair]) -> dict[str, Any] | None:
    need = [p for p in kept if p.source != p.target]
    if not need:
        return None
    for change in sorted(alignment.prefixes, key=lambda c: -c.keys):
        if change.strip and not change.add:
            n = sum(_strip_all(p.source, change.strip) == p.target for p in need)
            harm = any(p.source == p.target and p.source.startswith(change.strip) for p in kept)
            if 2 * n >= len(need) and not harm:
                return {"strip_prefix": change.strip}
        if change.add and not change.strip:
            n = sum(p.target == change.add + p.source for p in need)
            if 2 * n >= len(need) and len(need) == len(kept) and all(p.target.startswith(change.add) for p in kept):
                return {"add_prefix": change.add}
    return None


def _name_steps(plan: _Plan) -> tuple[list[Any], list[list[int | None]]]:
    """The parsed name steps, and per step which rule each of its patterns is (None: not a rename rule)."""
    from ..rules.parse import parse_rules

    steps = []
    owners: list[list[int | None]] = []
    parsed = parse_rules({"version": 1, "rules": plan.steps()}).steps
    mapping_rules = list(range(len(plan.rules)))
    i = 0
    if plan.drop:
        steps.append(parsed[i])
        owners.append([None] * len(plan.drop))
        i += 1
    if plan.prefix:
        steps.append(parsed[i])
        owners.append([None])
        i += 1
    if mapping_rules:
        steps.append(parsed[i])
        owners.append(list(mapping_rules))
        i += 1
    return steps, owners


def _simulate(plan: _Plan, kept: list[Pair], untouched: Sequence[str] = ()) -> tuple[set[int], list[tuple[int, int]]]:
    """Run the name steps over every kept source key: the rules that touched a key they are
    not for (or failed their own), and (thief, victim) pairs inside the one rename mapping.
    The ``untouched`` source keys (left undeclared) must pass every rename untouched."""
    steps, owners = _name_steps(plan)
    owner_of: dict[str, int] = {}
    for n, r in enumerate(plan.rules):
        for s in r.sources:
            owner_of[s] = n
    bad: set[int] = set()
    steals: list[tuple[int, int]] = []
    for key in untouched:
        name: str | None = key
        for step, own in zip(steps, owners):
            name, hits = step.name_map(name)
            if own[0] is not None and hits:
                bad.add(own[hits[0]])
            if name is None:
                break
    for p in kept:
        key: str | None = p.source
        touched: list[int] = []
        for step, own in zip(steps, owners):
            new, hits = step.name_map(key)
            if own[0] is not None and hits:
                touched.append(own[hits[0]])
            key = new
            if key is None:
                break
        mine = owner_of.get(p.source)
        wrong = [n for n in touched if n != mine]
        bad.update(wrong)
        if key != p.target and not wrong and mine is not None:
            bad.add(mine)
        if mine is not None and mine not in touched and wrong:
            steals.extend((n, mine) for n in wrong)
    return bad, steals


def _fit_renames(plan: _Plan, groups: list[_Group], kept: list[Pair], untouched: Sequence[str] = ()) -> None:
    """Narrow rules until every kept key reaches its target: first by putting a rule that
    took another's key after it, then by anchoring, listing indices, and one key per rule."""
    from ..rules.patterns import compile_regex

    rank = {id(g): float(n) for n, g in enumerate(groups)}
    moved: set[tuple[int, int]] = set()
    for _ in range(200):
        plan.rules = sorted(_rules(groups), key=lambda r: rank[id(r.groups[0])])
        seen: dict[str, int] = {}
        clash: set[int] = set()
        for n, r in enumerate(plan.rules):
            if r.pattern in seen:  # one pattern, two replacements: tell them apart
                clash.update((n, seen[r.pattern]))
            seen.setdefault(r.pattern, n)
        bad, steals = (clash, []) if clash else _simulate(plan, kept, untouched)
        if not bad:
            return
        progressed = False
        for thief, victim in steals:
            t, v = plan.rules[thief], plan.rules[victim]
            ident = (id(t.groups[0]), id(v.groups[0]))
            if ident in moved or (ident[1], ident[0]) in moved:
                continue
            if all(compile_regex(v.pattern).search(s) for s, _, _ in v.rows):
                moved.add(ident)
                for g in t.groups:
                    rank[id(g)] = rank[id(v.groups[0])] + 0.5
                progressed = True
        if progressed:
            continue
        for n in bad:
            for g in plan.rules[n].groups:
                g.deepen()
    raise AssertionError("renames did not converge")  # pragma: no cover


_PART = "REMAPPART"  # stands for the part's name while a merge's pattern is drafted
_CAP = r"(\d+)"


def _regroup_steps(named: Sequence[Any], names: dict[str, str | None], others: Sequence[str],
                   shapes: Any) -> list[tuple[str, Any, int, str]]:  # fmt: skip
    """``split`` and ``merge`` steps for the regroups whose fused name gives the order of the
    parts: one step per family (indices captured, as renames are) when its pattern catches no
    other key, else one per regroup, its names written out. They run after the renames, on
    the names the renames leave (``names``: each fused source key's)."""
    families: dict[tuple[Any, ...], list[Any]] = defaultdict(list)
    for r in named:
        if any(names.get(k) is None for k in r.sources):
            continue
        skel = tuple(_skel(names[k] or k) for k in r.sources) + tuple(_skel(t) for t in r.targets)
        families[(r.kind, r.dim, skel)].append(r)
    out: list[tuple[str, Any, int, str]] = []
    for (kind, dim, _), rs in families.items():
        why = rs[0].detail.split(" in '")[0]
        n = sum(len(r.targets) if kind == "split" else len(r.sources) for r in rs)
        step = _regroup_step(kind, dim, rs, names, others, shapes, fold=True)
        if step is not None:
            out.append((kind, step, n, why))
            continue
        for r in rs:
            one = _regroup_step(kind, dim, [r], names, others, shapes, fold=False)
            if one is None:  # pragma: no cover - a literal pattern always fits
                raise AssertionError(f"no {kind} step for {r}")
            out.append((kind, one, len(r.targets) if kind == "split" else len(r.sources), why))
    return _fold_leaves(out, others)


_LEAF = re.compile(r"^(.*\\\.)([A-Za-z_]+)\$$")


def _fold_leaves(steps: list[tuple[str, Any, int, str]], others: Sequence[str]) -> list[tuple[str, Any, int, str]]:
    """Steps that differ only in the leaf (``qkv.weight``, ``qkv.bias``) as one, the leaf
    captured: ``'^blocks\\.(\\d+)\\.attn\\.qkv\\.(bias|weight)$'``."""
    from ..rules.patterns import compile_regex

    buckets: dict[tuple[Any, ...], list[tuple[str, Any, int, str, str]]] = defaultdict(list)
    out: list[tuple[str, Any, int, str]] = []
    for kind, step, n, why in steps:
        m = _LEAF.match(step["match"])
        leaf = m.group(2) if m else ""
        into = step["into"] if kind == "split" else [step["into"]]
        if not m or not all(t.endswith("." + leaf) for t in into):
            out.append((kind, step, n, why))
            continue
        rest = {k: v for k, v in step.items() if k not in ("match", "into")}
        key = (kind, m.group(1), tuple(t[: -len(leaf)] for t in into), json.dumps(rest, sort_keys=True), why)
        buckets[key].append((kind, step, n, why, leaf))
    for (kind, head, into, _, why), members in buckets.items():
        if len(members) == 1:
            out.append(members[0][:4])
            continue
        leaves = sorted(m[4] for m in members)
        pattern = f"{head}({'|'.join(leaves)})$"
        group = compile_regex(pattern).groups
        folded = {k: v for k, v in members[0][1].items()}
        folded["match"] = pattern
        ref = f"\\g<{group}>" if group > 9 else f"\\{group}"
        folded["into"] = [t + ref for t in into] if kind == "split" else into[0] + ref
        if kind == "merge":
            folded["group"] = group - 1  # the part: the leaf's group now comes last
        out.append((kind, folded, sum(m[2] for m in members), why))
    return out


def _skel(key: str) -> str:
    return "".join("#" if idx else text for text, idx in index_tokens(key))


def _regroup_step(kind: str, dim: int, rs: Sequence[Any], names: dict[str, str | None], others: Sequence[str],
                  shapes: Any, *, fold: bool) -> dict[str, Any] | None:  # fmt: skip
    """One split/merge step for the regroups ``rs`` (a family), or None when the folded
    pattern would catch another key or needs index arithmetic the step has not."""
    dummy = Pair("", "", "", "", (), ())
    if kind == "split":
        sources = [names[r.sources[0]] or r.sources[0] for r in rs]
        patterns, templates = set(), []
        for j in range(len(rs[0].targets)):
            rows = [(src, r.targets[j], dummy) for src, r in zip(sources, rs)]
            rendered = _render_rows(rows, fold)
            if rendered is None:
                return None
            patterns.add(rendered[0])
            templates.append(rendered[1])
        if len(patterns) != 1:
            return None
        pattern = patterns.pop()
        if _matches_any(pattern, [k for k in others if k not in set(sources)]):
            return None
        step: dict[str, Any] = {"match": pattern, "into": templates, "dim": dim}
        sizes = [shapes[t].shape[dim] for t in rs[0].targets]
        if len(set(sizes)) > 1:  # grouped-query q, k, v: unequal parts
            step["sizes"] = sizes
        return step
    parts = [[names[k] or k for k in r.sources] for r in rs]
    cut = [_middle(ps) for ps in parts]
    if any(c is None for c in cut) or len({tuple(c[1]) for c in cut if c}) != 1:
        return None
    order = list(cut[0][1])  # type: ignore[index]
    rows = [(pre + _PART + post, r.targets[0], dummy) for (pre, _, post), r in zip(cut, rs)]  # type: ignore[misc]
    rendered = _render_rows(rows, fold)
    if rendered is None or _PART not in rendered[0]:
        return None
    pattern, template = rendered
    before, _, after = pattern.partition(_PART)
    if _CAP in after:  # the part's group would shift the later ones: written out instead
        return None
    pattern = before + "(" + "|".join(escape(o) for o in order) + ")" + after
    every = {k for ps in parts for k in ps}
    if _matches_any(pattern, [k for k in others if k not in every]):
        return None
    return {"match": pattern, "into": template, "order": order, "dim": dim}  # the part is the last group


def _render_rows(rows: list[tuple[str, str, Pair]], fold: bool) -> tuple[str, str] | None:
    """(whole-name pattern, template) for rows that one rename would carry, without ``add``."""
    if not fold:
        (s, t, _), = rows[:1]
        return "^" + escape(s) + "$", t
    groups = _solve(rows)
    if len(groups) != 1 or groups[0].level:
        return None
    g = groups[0]
    pattern, template, add = _render(g, g.s_elems, g.t_elems, True, listed=False)
    return (pattern, template) if not add else None


def _middle(names: Sequence[str]) -> tuple[str, list[str], str] | None:
    """The common head and tail of a merge's part names, and what differs (the parts)."""
    head = os.path.commonprefix(list(names))
    tail = os.path.commonprefix([n[len(head):][::-1] for n in names])[::-1]
    mids = [n[len(head) : len(n) - len(tail)] for n in names]
    if not all(mids) or len(set(mids)) != len(mids):
        return None
    return head, mids, tail


def _comment(rule_pairs: Sequence[Pair]) -> str:
    kinds = [e for e in EVIDENCE if any(p.evidence == e for p in rule_pairs)]
    notes = [EVIDENCE_NOTES[k] for k in kinds]
    for how in ("by number", "as in the other instances"):  # how same-shaped keys were told apart
        if any(p.detail.endswith(", " + how) for p in rule_pairs):
            notes.append(f"same-shaped ones {how}")
    if any(p.evidence == "graph" and "in the graph's order" in p.detail for p in rule_pairs):
        notes.append("same-shaped ones by the graph's order against the forward pass's")
    n = len(rule_pairs)
    return f"# {n} key{'' if n == 1 else 's'}, " + "; ".join(notes)


def _fold(keys: Sequence[str], limit: int = 2) -> str:
    from .render import fold

    groups = fold(keys)
    text = ", ".join(groups[:limit])
    return text + (f" and {len(groups) - limit} more" if len(groups) > limit else "")


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def draft_rules(alignment: Alignment, *, path: str | os.PathLike[str] | None = None) -> DraftRules:
    """The smallest rules that load what ``alignment`` pairs unambiguously. ``path`` is
    where the file will be written (a checkpoint source is named relative to it)."""
    from ..errors import InternalError

    fixable = [p for p in alignment.pairs if p.conflict is None or p.conflict.fix in _FIXES]
    unfixable = [p for p in alignment.pairs if p.conflict is not None and p.conflict.fix not in _FIXES]
    open_s, open_t = _undeclared(alignment, bool(fixable))
    picks = _picked_layers(alignment, fixable)
    if picks:
        held = {k for pick in picks for k in (*pick.sources, *pick.targets)}
        fixable = [p for p in fixable if p.source not in held]
        open_s += [k for k in alignment.source if k in held and k not in set(open_s)]
        open_t += [k for k in alignment.target if k in held and k not in set(open_t)]
    drop_set = {*alignment.source_only, *(p.source for p in unfixable)} - set(open_s)
    missing_set = {*alignment.target_only, *(p.target for p in unfixable)} - set(open_t)
    drop_keys = [k for k in alignment.source if k in drop_set]
    order_t = {k: i for i, k in enumerate(alignment.target)}
    missing_keys = sorted(missing_set, key=order_t.__getitem__)

    plan = _Plan(drop=cover(drop_keys, alignment.source))
    plan.prefix = _choose_prefix(alignment, fixable)
    prefix_steps = _name_steps(_Plan(prefix=plan.prefix))[0] if plan.prefix else []
    rows = []
    for p in fixable:
        cur = p.source
        for step in prefix_steps:
            cur = step.name_map(cur)[0]
        if cur != p.target:
            rows.append((cur, p.target, p))
    groups = _groups(rows)
    order_s = {k: i for i, k in enumerate(alignment.source)}
    groups.sort(key=lambda g: min(order_s[r[2].source] for r in g.rows))
    named = [r for r in alignment.regroups if r.detail]
    fused = [k for r in named for k in r.sources]
    _fit_renames(plan, groups, fixable, [*open_s, *fused])
    names = _names_after(plan, open_s)
    fused_names = _names_after(plan, fused)
    others = [p.target for p in fixable] + [n for n in (*names.values(), *fused_names.values()) if n is not None]
    plan.regroups = _regroup_steps(named, fused_names, others, alignment.target)

    finals = [p.target for p in fixable] + [n for n in names.values() if n is not None] + [t for r in named for t in r.targets]
    for fix in _FIXES:
        chosen = [p for p in fixable if p.conflict is not None and p.conflict.fix == fix]
        by_dims: dict[int, list[Pair]] = defaultdict(list)
        for p in chosen:
            by_dims[len(p.source_shape) if fix == "permute" else 0].append(p)
        for ndim, ps in by_dims.items():
            patterns = [r for r, _ in cover([p.target for p in ps], finals, subtrees=False)]
            match: Any = patterns[0] if len(patterns) == 1 else patterns
            if fix == "transpose":
                square = sum(p.source_shape == p.target_shape for p in ps)  # a layout the role says, not the shape
                why = ("shapes reversed" if not square else "stored (in, out) in the ONNX graph" if square == len(ps)
                       else f"shapes reversed, or stored (in, out) in the ONNX graph ({square})")  # fmt: skip
                plan.ops.append(("transpose", match, len(ps), why))
            elif fix == "permute":
                plan.ops.append(("transpose", {"match": match, "dims": list(range(ndim - 1, -1, -1))}, len(ps), "shapes reversed"))
            else:
                plan.ops.append(("reshape", {"match": match, "shape": "target"}, len(ps), "only size-1 dims differ"))

    missing = cover(missing_keys, [k for k in alignment.target if k not in alignment.tied])
    rules: dict[str, Any] = {"version": 1}
    source_section = _source_section(alignment, path)
    if source_section:
        rules["source"] = source_section
    target_section = _target_section(alignment)
    if target_section:
        rules["target"] = target_section
    steps = plan.steps()
    if steps:
        rules["rules"] = steps
    if missing:
        rules["expect"] = {"missing": [r for r, _ in missing]}

    _check(rules, alignment, fixable, open_s, open_t, InternalError, named, [t for pick in picks for t in pick.targets])
    text = _yaml(alignment, plan, missing, rules, unfixable, path, _Open(open_s, open_t, names, picks))
    renames = len(plan.rules) + (1 if plan.prefix else 0)
    loaded = len(fixable) + sum(len(r.targets) for r in named)
    return DraftRules(rules, text, loaded, renames, tuple(drop_keys), tuple(missing_keys),
                      len(alignment.choices), len(unfixable), tuple(open_s), tuple(open_t))  # fmt: skip


def _undeclared(alignment: Alignment, loads: bool) -> tuple[list[str], list[str]]:
    """The source and target keys the draft leaves undeclared, so that ``remap apply`` fails
    and names them until a person decides: every key of a choice; every leftover key that
    some leftover key on the other side could feed or take (a shape an op could fit, or a
    merge/split candidate); the keys the alignment ``held`` (a module an ONNX exporter folded
    away: see its notes); and, when nothing at all pairs, every key (no declaration can
    rest on evidence then, and declaring them would pass a load of nothing). The rest, a
    leftover whose shape nothing on the other side could fit, is declared: that is evidence."""
    if not loads:
        return list(alignment.source), [k for k in alignment.target if k not in set(alignment.tied)]
    left_s = [*alignment.source_only, *(s for c in alignment.choices for s in c.sources)]
    left_t = [*alignment.target_only, *(t for c in alignment.choices for t in c.targets)]
    shapes_s = {alignment.source[k].shape for k in left_s}
    shapes_t = {alignment.target[k].shape for k in left_t}
    related = {(a, b) for a in shapes_s for b in shapes_t if a == b or candidate_ops(a, b).ops}
    fit_s = {a for a, _ in related}
    fit_t = {b for _, b in related}
    regrouped = {k for r in alignment.regroups for k in (*r.sources, *r.targets)}
    chosen_s = {s for c in alignment.choices for s in c.sources}
    chosen_t = {t for c in alignment.choices for t in c.targets} | set(alignment.held)
    open_s = [k for k in alignment.source if k in chosen_s or (k in set(left_s) and (alignment.source[k].shape in fit_s or k in regrouped))]
    open_t = [k for k in alignment.target if k in chosen_t or (k in set(left_t) and (alignment.target[k].shape in fit_t or k in regrouped))]
    return open_s, open_t


@dataclass(frozen=True)
class _Open:
    """What the draft leaves undeclared, and each source key's name where a rename written
    after the drafted steps would see it (None: a drafted step drops it)."""

    sources: list[str]
    targets: list[str]
    names: dict[str, str | None]
    picks: list[_Pick] = field(default_factory=list)


@dataclass(frozen=True)
class _Pick:
    """A family of blocks with more instances in the source than in the target, the rest of
    each instance alike (a distillation student taking teacher layers): which instances
    go is not in the names or shapes, so the draft writes choices, never a pick."""

    family: str  # 'blocks.#'
    pattern: str  # '^blocks\.(\d+)\.'
    template: str  # 'blocks.\1.'
    have: tuple[int, ...]  # the source's instances
    want: int  # how many the target has
    sources: tuple[str, ...]
    targets: tuple[str, ...]


def _picked_layers(alignment: Alignment, kept: Sequence[Pair]) -> list[_Pick]:
    """Families (``blocks.#``) where the pairs load some instances and the leftovers are
    whole further instances of the same make-up: which the target takes (the first N? every
    other?) nothing says; the pairs only matched names. See :class:`_Pick`."""
    left = set(alignment.source_only)
    fams: dict[tuple[str, ...], dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for key in alignment.source:
        comps = key.split(".")
        for j, c in enumerate(comps[:-1]):
            if c.isdigit() and (c == "0" or c[0] != "0"):
                fams[tuple(comps[:j])][int(c)].append(key)
                break
    by_source = {p.source: p for p in kept}
    out = []
    for head, inst in fams.items():
        paired = {v: keys for v, keys in inst.items() if all(k in by_source for k in keys)}
        rest = {v: keys for v, keys in inst.items() if all(k in left for k in keys)}
        if not paired or not rest or len(paired) + len(rest) != len(inst) or len(paired) < 1:
            continue
        n = len(head) + 1

        def make_up(keys: list[str]) -> list[tuple[str, tuple[int, ...]]]:
            return sorted((".".join(k.split(".")[n:]), alignment.source[k].shape) for k in keys)

        shapes = {tuple(make_up(keys)) for keys in inst.values()}
        if len(shapes) != 1:
            continue
        rows = []
        for v, keys in paired.items():
            for k in keys:
                t = by_source[k].target
                rel = ".".join(k.split(".")[n:])
                if not t.endswith("." + rel):
                    break
                rows.append((".".join([*head, str(v)]) + ".", t[: len(t) - len(rel)], by_source[k]))
            else:
                continue
            break
        else:
            groups = _solve(list(dict.fromkeys((a, b, None) for a, b, _ in rows)))  # type: ignore[arg-type]
            if len(groups) != 1 or any(e[0] == "ref" and e[2] for e in groups[0].t_elems):
                continue
            g = groups[0]
            pattern, template, _ = _render(g, g.s_elems, g.t_elems, False, listed=False)
            if len(paired) == 1 or "(" not in pattern:
                head_text = escape(".".join(head)) + "\\." if head else ""
                pattern, template = f"^{head_text}(\\d+)\\.", ""
            sources = tuple(k for keys in inst.values() for k in keys)
            targets = tuple(by_source[k].target for keys in paired.values() for k in keys)
            out.append(_Pick(".".join([*head, "#"]), pattern, template, tuple(sorted(inst)), len(paired), sources, targets))
    return out


def _pick_lines(picks: Sequence[_Pick]) -> list[str]:
    """Commented choices for each family of picked layers: a ``map`` per plausible pick (the
    first N, the last N, evenly spaced), none of them written."""
    out: list[str] = []
    for pick in picks:
        have, n = list(pick.have), pick.want
        options: dict[str, list[int]] = {f"the first {n}": have[:n], f"the last {n}": have[-n:]}
        if n > 1:
            step = len(have) / n
            options["evenly spaced, from the first"] = [have[int(i * step)] for i in range(n)]
            options["evenly spaced, ending at the last"] = [have[len(have) - 1 - int((n - 1 - i) * step)] for i in range(n)]
        out.append(f"  # LAYERS PICKED, not written: the source has {len(have)} '{pick.family}' blocks, the target {n}, each alike; "
                   "which the target takes is not in names or shapes: uncomment ONE line (or write your own `map`/`select`)")
        template = pick.template or "TARGET.\\1."
        seen = set()
        for why, keep in options.items():
            if tuple(keep) in seen:
                continue
            seen.add(tuple(keep))
            table = {v: i for i, v in enumerate(keep)}
            rule = {"from": pick.pattern, "to": template, "map": {1: table}}
            out.append(f"  # - rename: {_flow(rule)}  # {why}")
    return out


def _names_after(plan: _Plan, keys: Sequence[str]) -> dict[str, str | None]:
    """Each key's name once the drafted name steps have run over it."""
    steps = _name_steps(plan)[0]
    out: dict[str, str | None] = {}
    for key in keys:
        name: str | None = key
        for step in steps:
            name = step.name_map(name)[0]
            if name is None:
                break
        out[key] = name
    return out


def _check(rules: dict[str, Any], alignment: Alignment, kept: list[Pair], open_s: Sequence[str], open_t: Sequence[str],
           error: Any, named: Sequence[Any] = (), picked: Iterable[str] = ()) -> None:  # fmt: skip
    """Plan the draft on names and shapes: it must load every kept pair, as paired, and
    nothing else; with the undeclared keys declared, nothing may fail (so that without
    them, ``remap apply`` fails for them and them alone)."""
    from ..planning.planner import make_plan
    from ..rules.parse import parse_rules

    checked = {k: v for k, v in rules.items() if k in ("version", "rules", "expect")}
    expect = dict(checked.get("expect") or {})
    expect["missing"] = list(expect.get("missing", [])) + [f"^{escape(k)}$" for k in open_t]
    expect["unused"] = [f"^{escape(k)}$" for k in open_s]
    if not kept:
        expect["min_loaded"] = 0
    checked["expect"] = {k: v for k, v in expect.items() if v != []}
    if open_t:  # an undeclared pair of differing shapes (a head with no certain fix) fails on its shape
        checked["shapes"] = {"skip": [f"^{escape(k)}$" for k in open_t]}
    plan = make_plan(parse_rules(checked), dict(alignment.source), dict(alignment.target))
    got = {a.target: a.sources for a in plan.assignments}
    tied = set(alignment.tied)  # a source copy of a tied alias is checked equal, not loaded
    wrong = [p for p in kept if p.target not in tied and got.get(p.target) != (p.source,)]
    joined = {t: r.sources for r in named for t in r.targets}  # a split's part comes from its one source; a merge from all, in order
    wrong += [Pair(", ".join(s), t, "", "", (), ()) for t, s in joined.items() if got.get(t) != s]
    stray = set(got) - {p.target for p in kept} - tied - set(joined) - set(picked)  # a picked layer's same name loads until a map says
    wrong += [Pair(", ".join(got[t]), t, "", "", (), ()) for t in sorted(stray)]
    if not plan.ok or wrong:
        details = [f.message for f in plan.failures][:5] + [f"{p.source} -> {p.target}: {got.get(p.target)}" for p in wrong[:5]]
        raise error("remap diff drafted rules that do not load what it aligned: " + "; ".join(details), details=rules)


def _source_section(alignment: Alignment, path: str | os.PathLike[str] | None) -> dict[str, Any]:
    d = alignment.source_description
    if d.get("kind") == "factory" and d.get("model"):
        return {"model": d["model"]}
    if d.get("kind") == "checkpoint" and d.get("abspath"):
        where = d["abspath"]
        if path is not None:
            folder = os.path.dirname(os.path.abspath(os.fspath(path)))
            try:
                where = os.path.relpath(d["abspath"], folder)
            except ValueError:  # another drive
                pass
        out: dict[str, Any] = {"path": where}
        if d.get("key") or d.get("detected_key"):
            out["key"] = d.get("key") or d["detected_key"]
        if d.get("trust_pickle"):
            out["trust_pickle"] = True
        return out
    return {}


def _target_section(alignment: Alignment) -> dict[str, Any]:
    d = alignment.target_description
    if d.get("kind") != "factory":
        return {}
    out: dict[str, Any] = {"model": d["model"]}
    if d.get("args"):
        out["args"] = list(d["args"])
    if d.get("kwargs"):
        out["kwargs"] = dict(d["kwargs"])
    return out


# --------------------------------------------------------------------------- YAML text


def _flow(value: Any) -> str:
    """A value in YAML flow style (JSON is YAML), strings single-quoted."""
    if isinstance(value, str):
        return _q(value)
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k if isinstance(k, int) or _WORD.match(str(k)) else _q(str(k))}: {_flow(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def _aligned(lines: list[tuple[str, str]]) -> list[str]:
    """Code with its comment, the comments in one column (within reason)."""
    width = min(max((len(code) for code, c in lines if c), default=0), 100)
    return [f"{code.ljust(width)}  {c}".rstrip() if c else code for code, c in lines]


def _yaml(alignment: Alignment, plan: _Plan, missing: list[tuple[str, tuple[str, ...]]], rules: dict[str, Any],
          unfixable: list[Pair], path: str | os.PathLike[str] | None, open_: _Open) -> str:  # fmt: skip
    from .. import __version__

    sd, td = alignment.source_description, alignment.target_description
    n_src, n_tgt = len(alignment.source), len(alignment.target) - len(alignment.tied)
    n_missing = len({k for _, keys in missing for k in keys})
    loaded = n_tgt - n_missing - len(open_.targets)
    lines = [
        f"# Drafted by `remap diff` (remap {__version__}). REVIEW IT BEFORE USE: nothing here was checked",
        "# against the tensors' values. Each line rests on the evidence in its comment (names, shapes and",
        "# the modules they sit in); read every one, then load with `remap apply` and compare the outputs.",
        f"#   source: {sd.get('text', 'a state_dict')} ({n_src} tensors)",
        f"#   target: {td.get('text', 'a mapping')} ({n_tgt} keys)",
        f"# Loads {loaded} of {n_tgt} target keys; drops {_n(sum(len(k) for _, k in plan.drop), 'source key')}; "
        f"{_n(n_missing, 'target key')} keep{'s' if n_missing == 1 else ''} their initial values.",
    ]
    if open_.sources or open_.targets:
        lines.append(f"# Leaves {_open_counts(len(open_.sources), len(open_.targets))} undeclared: `remap apply` fails and lists them "
                     "until you decide (see UNDECLARED below).")  # fmt: skip
    lines.append("version: 1")
    if "source" in rules:
        notes = {"key": "# where the weights sit in the checkpoint" + (" (found by remap diff)" if not sd.get("key") else ""),
                 "trust_pickle": "# as given to remap diff: unpickling runs code from the file; trust it"}  # fmt: skip
        lines += ["", "source:"] + _aligned([(f"  {k}: {_flow(v)}", notes.get(k, "")) for k, v in rules["source"].items()])
    if "target" in rules:
        lines += ["", "target:"] + [f"  {k}: {_flow(v)}" for k, v in rules["target"].items()]
    elif td.get("kind") == "checkpoint":
        lines += ["", "# target: the diff compared a checkpoint; give the model with --target module.path:callable"]
    choices = _choice_lines(alignment, open_) + _pick_lines(open_.picks)
    undeclared = _undeclared_comments(alignment, open_) + _regroup_comments(alignment)
    conflicts = _conflict_comments(unfixable)
    if "rules" not in rules and choices:
        lines += ["", "# rules:                  # uncomment this line too when you uncomment a choice below"]
    elif "rules" not in rules:
        lines += ["", "# rules: none needed: every paired key has the same name and shape on both sides"]
    else:
        lines += ["", "rules:"]
        if plan.drop:
            lines.append("  - drop:                    # source keys that reach no target key")
            lines += _aligned([(f"      - {_q(r)}", f"# {_fold(keys)}") for r, keys in plan.drop])
        if plan.prefix:
            (kind, value), = plan.prefix.items()
            n = sum(1 for p in alignment.pairs if p.evidence == "prefix")
            lines += _aligned([(f"  - {kind}: {_q(value)}", f"# {n} key{'' if n == 1 else 's'}, prefix found in the names")])
        if plan.rules:
            lines.append("  - rename:")
            lines += _aligned([(f"      {_q(r.pattern)}: {_value(r)}", _comment([p for _, _, p in r.rows])) for r in plan.rules])
        ops = []
        for kind, value, n, what in (*plan.regroups, *plan.ops):
            ops.append((f"  - {kind}: {_flow(value)}", f"# {n} key{'' if n == 1 else 's'}, {what}"))
        lines += _aligned(ops)
        lines += [f"  # NOTE: {n}" for n in alignment.notes]
    lines += choices
    if undeclared or conflicts:
        lines.append("")
        lines += conflicts + undeclared
    if missing:
        lines += ["", "expect:", "  missing:                 # target keys nothing loads: they keep their initial values"]
        lines += _aligned([(f"    - {_q(r)}", f"# {_fold(keys)}") for r, keys in missing])
    # one element, one line: a key holding a newline or an escape must not end a comment and
    # write a rule of its own (the draft is a file people run), nor drive the reviewer's terminal
    return "\n".join(map(printable, lines)) + "\n"


def _value(rule: _Rule) -> str:
    """A rename's value: the replacement, or ``{to: …, add: {1: -1}}`` with index arithmetic."""
    if not rule.add:
        return _q(rule.template)
    return "{to: " + _q(rule.template) + ", add: " + _flow(dict(rule.add)) + "}"


def _choice_lines(alignment: Alignment, open_: _Open) -> list[str]:
    """Per ambiguous source key, a commented-out rename to one of its candidates, for the
    reviewer to uncomment (or point elsewhere): never written as a rule. The suggested
    targets are distinct, those with the key's own leaf name first; the comment names all."""
    out: list[tuple[str, str]] = []
    for c in alignment.choices:
        taken: set[str] = set()
        lines: list[tuple[str, str]] = []
        for s in c.sources:
            name = open_.names.get(s, s)
            if name is None:
                continue
            same_leaf = [t for t in c.targets if t.rpartition(".")[2] == s.rpartition(".")[2]]
            alts = same_leaf or list(c.targets)
            t = next((t for t in alts if t not in taken), next((t for t in c.targets if t not in taken), alts[0]))
            taken.add(t)
            shown = " or ".join(alts[:3]) + (f" or {len(alts) - 3} more" if len(alts) > 3 else "")
            lines.append((f"  # - rename: {_flow({'^' + escape(name) + '$': t})}", f"# choice: {s} -> {shown} (same shape {_shape(c.shape)})"))
        if lines:
            out.append((f"  # AMBIGUOUS, not written: {_fold(c.sources, 3)} {_shape(c.shape)} could feed any of {_fold(c.targets, 3)}; "
                        "each line is one candidate, not a pick: set the target you choose, then uncomment it (each target once)", ""))  # fmt: skip
            out += lines
    return _aligned(out)


def _undeclared_comments(alignment: Alignment, open_: _Open) -> list[str]:
    """What the draft leaves undeclared, and why: `remap apply` fails and lists these keys."""
    if not open_.sources and not open_.targets:
        return []
    chosen = {k for c in alignment.choices for k in (*c.sources, *c.targets)}
    held = [k for k in open_.targets if k in set(alignment.held) and k not in chosen]
    out = ["# UNDECLARED, so `remap apply` fails and lists them until you decide:"]
    for pick in open_.picks:
        out.append(f"#   the '{pick.family}' blocks: the target has {pick.want} of the source's {len(pick.have)}; "
                   "choose which with a LAYERS PICKED line in rules")  # fmt: skip
        chosen |= {*pick.sources, *pick.targets}
    if not alignment.pairs:
        out.append("#   nothing pairs on evidence, so nothing is declared: declaring every key would pass a load of nothing")
    elif chosen:
        out.append("#   ambiguous keys: choose with the commented renames in rules (or drop / expect.missing what you do not want)")
    if held and alignment.pairs:
        out.append(f"#   target keys of modules the ONNX graph folded away: {_fold(held, 3)}; see the NOTE in rules, then fuse "
                   "them in the target or add them to expect.missing")  # fmt: skip
        chosen |= set(held)
    for side, keys in (("source", open_.sources), ("target", open_.targets)):
        rest = [k for k in keys if k not in chosen]
        if rest and alignment.pairs:
            how = "drop or rename them" if side == "source" else "rename a source key to them or add them to expect.missing"
            out.append(f"#   {side} keys that a leftover key of a related shape could {'feed' if side == 'target' else 'become'}: "
                       f"{_fold(rest, 3)}; {how}")  # fmt: skip
    return out


def _regroup_comments(alignment: Alignment) -> list[str]:
    from .render import regroup_rows

    return [f"# {op.split()[0].upper()} CANDIDATE, not written: {src} -> {tgt}: {op}; a `{op.split()[0]}` step could join "
            "them once you have checked the order of the parts" for src, tgt, op in regroup_rows(alignment)]  # fmt: skip


def _conflict_comments(unfixable: list[Pair]) -> list[str]:
    out = []
    for p in unfixable:
        ops = "; ".join(p.conflict.ops) if p.conflict and p.conflict.ops else "no single op"
        out.append(f"# SHAPE CONFLICT, not loaded: {p.source} {_shape(p.source_shape)} -> {p.target} {_shape(p.target_shape)} "
                   f"({p.evidence}); candidate ops: {ops}")  # fmt: skip
    return out


def write_draft(alignment: Alignment, path: str | os.PathLike[str], *, force: bool = False) -> DraftRules:
    """Draft the rules and write them to ``path`` atomically; an existing file is replaced
    only with ``force`` (a reviewed rules file is not overwritten unasked)."""
    from ..errors import UsageError
    from ..loading.saving import write_text_atomic

    if os.path.exists(path) and not force:
        raise UsageError(f"{os.fspath(path)!r} exists; pass --force to replace it")
    draft = draft_rules(alignment, path=path)
    write_text_atomic(path, draft.text)
    return draft
