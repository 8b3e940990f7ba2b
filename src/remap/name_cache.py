"""Running the leading name-only steps once per *shape* of key instead of once per key.

A model's keys repeat a few shapes: ``model.layers.7.mlp.experts.12.w1.weight`` has the
shape ``model.layers.#.mlp.experts.#.w1.weight``. When no pattern of a step can tell one
numeric component from another, every key of a shape goes through the step the same way.
So each numeric component (digits between dots, as ModuleList and ModuleDict indices are)
becomes one placeholder character (private-use Unicode, one per position), the patterns
are rewritten to match a placeholder wherever they could match such a component, the
steps run once per shape, and each key's names are restored by putting its numbers back.
Digits inside names (``w1``, ``conv2``) stay as they are.

A pattern is rewritten only when that is equivalent (see :func:`abstract_pattern`);
otherwise that step and the ones after it run key by key, as before.

>>> abstract_pattern(r"^layers\\.(\\d+)\\.") is not None
True
>>> abstract_pattern(r"^layers\\.0\\.") is None   # a literal index tells components apart
True
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

from .meta import TensorMeta
from .patterns import CaptureError, PatternError
from .steps import Item, NameStep, Step

__all__ = ["abstract_pattern", "leading_name_steps", "run_name_steps"]

PH_FIRST, PH_LAST = 0xE000, 0xF8FF
PH_CLASS = "[\\ue000-\\uf8ff]"
RUN = re.compile(r"(?<![^.])([0-9]+)(?![^.])")  # a whole dotted component of digits
HAS_RUN = re.compile(r"(?<![^.])[0-9]+(?![^.])")
HAS_PLACEHOLDER = re.compile("[\ue000-\uf8ff]")
# A placeholder that no longer stands between dots: a step glued a number to something.
FUSED = re.compile("[^.][\ue000-\uf8ff]|[\ue000-\uf8ff][^.]")
MAX_RUNS = PH_LAST - PH_FIRST

# Tokens of a pattern: an escape, a character class, a group opening, or one character.
TOKEN = re.compile(r"\\.|\[\^?\]?(?:\\.|[^\]])*\]|\(\?P<\w+>|\(\?:|\(\?[=!<]|.", re.DOTALL)
DIGIT_RUN = {"\\d", "[0-9]"}
NEVER_DIGIT_ESCAPES = {"\\.", "\\-", "\\_", "\\/", "\\D", "\\W", "\\s", "^", "$", "\\A", "\\Z"}


def _can_match_digit(tok: str) -> bool:
    if tok in NEVER_DIGIT_ESCAPES:
        return False
    if tok in (".", "\\w", "\\S"):
        return True
    if tok.startswith("["):
        body = tok[2:-1] if tok.startswith("[^") else tok[1:-1]
        has_digit = any(c.isdigit() for c in body) or "\\d" in body or "\\w" in body
        return has_digit if not tok.startswith("[^") else not ("\\d" in body or "0-9" in body)
    if tok.startswith("\\"):
        return tok[1:].isdigit() or tok[1] in "dwS"
    return tok.isdigit()


def abstract_pattern(pattern: str) -> str | None:
    """The pattern over keys whose numeric components are placeholders, or None when it
    could tell them apart: a literal digit that is not part of a name (``layers\\.0``), a
    counted repeat, a single-character match that could take part of a number, a word
    boundary, a lookaround, a backreference, or two neighbouring atoms that could split one
    number between them."""
    tokens = TOKEN.findall(pattern)
    out: list[str] = []
    prev_name_char = False  # the previous atom is a literal letter, underscore or name digit
    prev_digit_capable = False
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if tok in ("\\b", "\\B", "{", "\\\\") or tok.startswith(("(?=", "(?!", "(?<")):
            return None
        if tok in ("(", ")", "(?:", "|") or tok.startswith("(?P<"):
            out.append(tok)
            if tok == "|":
                prev_name_char = prev_digit_capable = False
            i += 1
            continue
        if tok in ("*", "+", "?"):
            out.append(tok)
            i += 1
            continue
        if tok.isdigit() and len(tok) == 1:  # a literal digit: only inside a name such as w1
            if not prev_name_char or nxt in ("*", "+", "?"):
                return None
            out.append(tok)
            prev_name_char, prev_digit_capable = True, False
            i += 1
            continue
        digit = _can_match_digit(tok)
        if digit and (nxt not in ("+", "*") or prev_digit_capable or nxt == ""):
            return None  # one character of a number, or two neighbours splitting one
        if tok in DIGIT_RUN:
            out.append(f"(?:{PH_CLASS}|[0-9]{nxt})")
            i += 2
        elif digit:
            out.append(_widen(tok))
            i += 1
        else:
            out.append(tok)
            i += 1
        prev_digit_capable = digit
        prev_name_char = not digit and (tok.isalpha() or tok == "_")
    return "".join(out)


def _widen(tok: str) -> str:
    """A digit-capable atom that must also match placeholders."""
    if tok == "\\w":
        return "[\\w\\ue000-\\uf8ff]"
    if tok == "\\S":
        return "[\\S]"  # placeholders are not whitespace: \S already matches them
    if tok.startswith("[^"):
        return tok  # a negated class matches placeholders unless it names them
    if tok.startswith("["):
        return tok[:-1] + "\\ue000-\\uf8ff]"
    return tok  # '.' matches placeholders


def leading_name_steps(steps: Sequence[Step]) -> list[tuple[Step, NameStep]]:
    """The leading steps that act on names only and can run on key shapes, each with its
    rewritten copy; the first step that cannot ends the list."""
    out = []
    for step in steps:
        if not isinstance(step, NameStep):
            break
        abstract = step.with_patterns(abstract_pattern)
        if abstract is None:
            break
        out.append((step, abstract))
    return out


SKELETON_MARK = "\ue000"


def _distinct(skeleton: str) -> str:
    """The skeleton with its n-th placeholder made the n-th placeholder character."""
    parts = skeleton.split(SKELETON_MARK)
    if len(parts) - 1 > MAX_RUNS:
        raise ValueError("too many numeric components")
    return "".join(p + (chr(PH_FIRST + n) if n < len(parts) - 1 else "") for n, p in enumerate(parts))


def _format_of(text: str) -> str:
    """A str.format template that puts the key's numbers back: placeholder n -> {n}."""
    out = text.replace("{", "{{").replace("}", "}}")
    return HAS_PLACEHOLDER.sub(lambda m: "{%d}" % (ord(m.group()) - PH_FIRST), out)


Outcome = tuple[str, list[tuple[int, str]], "Step | None"]  # final name format, hop formats, dropping step


def run_name_steps(
    steps: list[tuple[Step, NameStep]], source: dict[str, TensorMeta]
) -> tuple[list[Item], list[tuple[Item, Step]], list[list[int]]] | None:
    """Run ``steps`` over every source key, once per key shape.

    Returns the surviving items, the dropped ones with the step that dropped them, and
    each step's match counts per label — or None when the exact per-key run is needed
    for its messages (a step matched nothing, two keys collided, a capture error), so the
    caller runs the steps key by key.
    """
    keyed: list[tuple[str, str, list[str]]] = []
    weights: dict[str, int] = defaultdict(int)
    split = RUN.split
    for key in source:
        if HAS_PLACEHOLDER.search(key) is not None:
            return None
        parts = split(key)
        skeleton = SKELETON_MARK.join(parts[0::2]) if len(parts) > 1 else key
        keyed.append((key, skeleton, parts[1::2]))
        weights[skeleton] += 1
    counts = [[0] * len(step.labels()) for step, _ in steps]  # type: ignore[attr-defined]
    outcomes: dict[str, Outcome] = {}
    for skeleton, weight in weights.items():
        outcome = _run_shape(steps, _distinct(skeleton), weight, counts)
        if outcome is None:
            return None
        final, hops, dropper = outcome
        outcomes[skeleton] = (_format_of(final), [(i, _format_of(h)) for i, h in hops], dropper)
    if any(n == 0 for c, (step, _) in zip(counts, steps) if not step.optional for n in c):
        return None
    items, dropped = _restore(keyed, outcomes, source)
    if len({i.key for i in items}) != len(items):
        return None
    return items, dropped, counts


def _run_shape(steps: list[tuple[Step, NameStep]], key: str, weight: int, counts: list[list[int]]) -> tuple[str, list[tuple[int, str]], Step | None] | None:
    hops: list[tuple[int, str]] = []
    for n, (step, abstract) in enumerate(steps):
        try:
            new, hits = abstract.name_map(key)
        except (CaptureError, PatternError):
            return None  # the key-by-key run reports it, with the step that raised it
        for h in hits:
            counts[n][h] += weight
        if new is None:
            return key, hops, step
        if new != key and FUSED.search(new):
            return None  # a number no longer stands as a component of its own: run key by key
        if new != key:
            hops.append((step.index, new))
            key = new
    return key, hops, None


def _restore(keyed: list[tuple[str, str, list[str]]], outcomes: dict[str, Outcome],
             source: dict[str, TensorMeta]) -> tuple[list[Item], list[tuple[Item, Step]]]:  # fmt: skip
    """Each key's own names: its numbers put back into its shape's results, in source order."""
    items: list[Item] = []
    dropped: list[tuple[Item, Step]] = []
    for key, skeleton, runs in keyed:
        final, hops, dropper = outcomes[skeleton]
        item = Item(final.format(*runs), (key,), source[key], tuple((s, h.format(*runs)) for s, h in hops))
        if dropper is None:
            items.append(item)
        else:
            dropped.append((item, dropper))
    return items, dropped
