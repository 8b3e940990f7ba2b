r"""Planning throughput: remap's planner against the two rename loops people write today.

For each key-set family (ResNet-, LLM- and MoE-like names, with realistic shapes), size
and rule count, the same ordered rule list is run three ways on the same keys:

* **remap** — ``remap.make_plan(remap.parse_rules(rules), source_meta, target_meta)``,
  one step per rule; only ``make_plan`` is timed. Its inputs are the metadata as remap's
  own sources and modules hand it over (``TensorMeta`` per source key, read from a header;
  ``TargetMeta`` per target key, read from the module): the shapes the rules produce,
  computed once with the rule-by-rule loop. ``make_plan`` decides everything (names,
  pairing, shape checks, expectations, totals, ``plan.ok``); the per-key report records
  are built when first read, and **records** times that separately (what a printed or
  JSON report of every key costs on top);
* **rule-by-rule** — mmengine's ``revise_keys``: for each rule in order, ``re.sub`` over
  every key (a drop/keep rule filters every key with ``re.search``);
* **first-match** — transformers' ``key_mapping``: per key, the first rule that acts on
  it wins (``re.subn`` then ``break``; a drop acts when it matches, a keep when it does not).

The rule lists are written so that every key is acted on by at most one rule and no
rename produces a name a later rule matches; the three semantics then agree, and the
benchmark checks that they do (same final name for every source key, same dropped keys)
before it reports a ratio. Every rule acts on at least one key, so remap's
``unmatched_step`` check passes without ``optional: true``.

The 1- and 10-rule lists never tell one numeric key component from another (they
capture indices with ``(\d+)``), so remap plans them once per key *shape*
(``name_cache``). The 50-rule lists are fine-grained conversions that do: literal
``Sequential`` indices (``downsample\.0\.``), interleaved pipeline chunks and expert-parallel
ranks picked by an index's last digit (``(\d*[01])``). remap plans those once per class
of numbers the patterns can tell apart (pass / fail a digit test), not once per key.

A rule is a tuple: ``("rename", pattern, replacement)``, ``("strip_prefix", prefix)``,
``("drop", pattern)`` or ``("keep", pattern)``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from typing import Any

Shape = tuple[int, ...]
Rule = tuple[str, ...]

FULL_SIZES = (300, 7_000, 100_000)
QUICK_SIZES = (300, 3_000)
RULE_COUNTS = (1, 10, 50)


# --------------------------------------------------------------------------- key sets


def resnet_keys(n: int) -> dict[str, Shape]:
    """A torchvision-style bottleneck ResNet saved from DistributedDataParallel
    (``module.`` prefix), with six stages and as many blocks as it takes to reach ``n`` keys."""
    stages = 6
    blocks = max(stages, round((n - 8 - 6 * stages) / 18))
    per_stage = [blocks // stages + (1 if s < blocks % stages else 0) for s in range(stages)]
    keys: dict[str, Shape] = {}

    def bn(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{name}"] = (c,)
        keys[f"{prefix}.num_batches_tracked"] = ()

    keys["module.conv1.weight"] = (64, 3, 7, 7)
    bn("module.bn1", 64)
    cin = 64
    for s, count in enumerate(per_stage, start=1):
        width = 64 * 2 ** min(s - 1, 4)
        for b in range(count):
            p = f"module.layer{s}.{b}"
            keys[f"{p}.conv1.weight"] = (width, cin, 1, 1)
            bn(f"{p}.bn1", width)
            keys[f"{p}.conv2.weight"] = (width, width, 3, 3)
            bn(f"{p}.bn2", width)
            keys[f"{p}.conv3.weight"] = (4 * width, width, 1, 1)
            bn(f"{p}.bn3", 4 * width)
            if b == 0:
                keys[f"{p}.downsample.0.weight"] = (4 * width, cin, 1, 1)
                bn(f"{p}.downsample.1", 4 * width)
            cin = 4 * width
    keys["module.fc.weight"] = (1000, cin)
    keys["module.fc.bias"] = (1000,)
    return keys


def llm_keys(n: int) -> dict[str, Shape]:
    """A Hugging Face Llama/Qwen2-style decoder (q/k/v biases, old-style ``rotary_emb.inv_freq``
    buffers) with an RLHF value head, with as many layers as it takes to reach ``n`` keys."""
    hidden, inter, kv, vocab = 4096, 11008, 1024, 32000
    layers = max(10, round((n - 5) / 13))
    keys: dict[str, Shape] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for proj, out in (("q", hidden), ("k", kv), ("v", kv)):
            keys[f"{p}.self_attn.{proj}_proj.weight"] = (out, hidden)
            keys[f"{p}.self_attn.{proj}_proj.bias"] = (out,)
        keys[f"{p}.self_attn.o_proj.weight"] = (hidden, hidden)
        keys[f"{p}.self_attn.rotary_emb.inv_freq"] = (64,)
        keys[f"{p}.mlp.gate_proj.weight"] = (inter, hidden)
        keys[f"{p}.mlp.up_proj.weight"] = (inter, hidden)
        keys[f"{p}.mlp.down_proj.weight"] = (hidden, inter)
        keys[f"{p}.input_layernorm.weight"] = (hidden,)
        keys[f"{p}.post_attention_layernorm.weight"] = (hidden,)
    keys["model.norm.weight"] = (hidden,)
    keys["lm_head.weight"] = (vocab, hidden)
    keys["value_head.weight"] = (1, hidden)
    keys["value_head.bias"] = (1,)
    return keys


def moe_keys(n: int) -> dict[str, Shape]:
    """A Mixtral/DeepSeek-style MoE decoder (``mlp.experts.E.w1/w2/w3``, a router with a
    score-correction bias, a multi-token-prediction head ``mtp.``). Experts per layer grow
    with ``n`` (16, 64, 256); layers fill up to ``n`` keys."""
    hidden, inter, vocab = 2048, 1408, 102400
    experts = 16 if n < 2000 else 64 if n < 20_000 else 256
    layers = max(2, round((n - 6) / (8 + 3 * experts)))
    keys: dict[str, Shape] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for proj in ("q", "k", "v", "o"):
            keys[f"{p}.self_attn.{proj}_proj.weight"] = (hidden, hidden)
        keys[f"{p}.input_layernorm.weight"] = (hidden,)
        keys[f"{p}.post_attention_layernorm.weight"] = (hidden,)
        keys[f"{p}.mlp.gate.weight"] = (experts, hidden)
        keys[f"{p}.mlp.gate.e_score_correction_bias"] = (experts,)
        for e in range(experts):
            keys[f"{p}.mlp.experts.{e}.w1.weight"] = (inter, hidden)
            keys[f"{p}.mlp.experts.{e}.w2.weight"] = (hidden, inter)
            keys[f"{p}.mlp.experts.{e}.w3.weight"] = (inter, hidden)
    keys["model.norm.weight"] = (hidden,)
    keys["lm_head.weight"] = (vocab, hidden)
    for name, shape in (("enorm", (hidden,)), ("hnorm", (hidden,)), ("eh_proj", (hidden, 2 * hidden))):
        keys[f"mtp.0.{name}.weight"] = shape
    return keys


# --------------------------------------------------------------------------- rule lists

L = r"^model\.layers\.(\d+)\."
# interleaved pipeline chunks (by the layer's last digit) and expert-parallel ranks (by the expert's)
PAIRS = ("[01]", "[23]", "[45]", "[67]", "[89]")
PARITY = ("[02468]", "[13579]")
LLM_KINDS = (
    (r"self_attn\.q_proj\.", "attention.wq."),
    (r"self_attn\.k_proj\.", "attention.wk."),
    (r"self_attn\.v_proj\.", "attention.wv."),
    (r"self_attn\.o_proj\.", "attention.wo."),
    (r"mlp\.gate_proj\.", "feed_forward.w1."),
    (r"mlp\.down_proj\.", "feed_forward.w2."),
    (r"mlp\.up_proj\.", "feed_forward.w3."),
    (r"input_layernorm\.", "attention_norm."),
    (r"post_attention_layernorm\.", "ffn_norm."),
)
MOE_KINDS = (
    *LLM_KINDS[:4],
    *LLM_KINDS[7:],
    (r"mlp\.gate\.weight$", "feed_forward.gate.weight"),
    (r"mlp\.gate\.e_score_correction_bias$", "feed_forward.gate.bias"),
)
GLOBALS = (
    ("rename", r"^model\.embed_tokens\.", "tok_embeddings."),
    ("rename", r"^model\.norm\.", "norm."),
    ("rename", r"^lm_head\.", "output."),
)


def resnet_rules(count: int) -> list[Rule]:
    """torchvision ResNet (DDP) -> detectron2 naming (``stem``, ``res2``..., ``conv1.norm``)."""
    if count == 1:
        return [("strip_prefix", "module.")]
    head: list[Rule] = [
        ("drop", r"\.num_batches_tracked$"),
        ("drop", r"^module\.fc\."),
        ("rename", r"^module\.conv1\.", "stem.conv1."),
        ("rename", r"^module\.bn1\.", "stem.conv1.norm."),
    ]
    if count == 10:
        return head + [("rename", rf"^module\.layer{s}\.", f"res{s + 1}.") for s in range(1, 7)]
    fine: list[Rule] = []
    for s in range(1, 7):
        p = rf"^module\.layer{s}\.(\d+)\."
        for c in (1, 2, 3):
            fine.append(("rename", rf"{p}conv{c}\.", rf"res{s + 1}.\1.conv{c}."))
        for c in (1, 2, 3):
            fine.append(("rename", rf"{p}bn{c}\.", rf"res{s + 1}.\1.conv{c}.norm."))
        fine.append(("rename", rf"{p}downsample\.0\.", rf"res{s + 1}.\1.shortcut."))
        fine.append(("rename", rf"{p}downsample\.1\.", rf"res{s + 1}.\1.shortcut.norm."))
    # the last stage's last kinds fall through to the catch-all prefix strip
    return (head + fine)[: count - 1] + [("strip_prefix", "module.")]


def llm_rules(count: int) -> list[Rule]:
    """Hugging Face Llama -> Meta's naming; 50 rules spread the layers over five interleaved
    pipeline chunks."""
    if count == 1:
        return [("rename", L, r"blocks.\1.")]
    head: list[Rule] = [
        ("keep", r"^(model|lm_head)\."),
        ("drop", r"\.rotary_emb\.inv_freq$"),
        *GLOBALS,
    ]
    if count == 10:
        return head + [
            ("rename", rf"{L}self_attn\.(q|k|v)_proj\.", r"layers.\1.attention.w\2."),
            ("rename", rf"{L}self_attn\.o_proj\.", r"layers.\1.attention.wo."),
            ("rename", rf"{L}mlp\.", r"layers.\1.feed_forward."),
            ("rename", rf"{L}input_layernorm\.", r"layers.\1.attention_norm."),
            ("rename", rf"{L}post_attention_layernorm\.", r"layers.\1.ffn_norm."),
        ]
    fine = [
        ("rename", rf"^model\.layers\.(\d*{digits})\.{pattern}", rf"chunks.{c}.layers.\1.{name}")
        for c, digits in enumerate(PAIRS)
        for pattern, name in LLM_KINDS
    ]
    return (head + fine)[:count]


def moe_rules(count: int) -> list[Rule]:
    """Hugging Face Mixtral/DeepSeek -> Meta's naming; 50 rules split the layers over two
    pipeline stages and the experts over ten expert-parallel ranks."""
    if count == 1:
        return [("rename", rf"{L}mlp\.experts\.(\d+)\.", r"layers.\1.feed_forward.experts.\2.")]
    head: list[Rule] = [("drop", r"^mtp\."), *GLOBALS]
    if count == 10:
        return head + [
            ("rename", rf"{L}self_attn\.(q|k|v)_proj\.", r"layers.\1.attention.w\2."),
            ("rename", rf"{L}self_attn\.o_proj\.", r"layers.\1.attention.wo."),
            ("rename", rf"{L}mlp\.gate\.", r"layers.\1.feed_forward.gate."),
            ("rename", rf"{L}mlp\.experts\.(\d+)\.", r"layers.\1.feed_forward.experts.\2."),
            ("rename", rf"{L}input_layernorm\.", r"layers.\1.attention_norm."),
            ("rename", rf"{L}post_attention_layernorm\.", r"layers.\1.ffn_norm."),
        ]
    stages = [
        ("rename", rf"^model\.layers\.(\d*{digits})\.{pattern}", rf"stages.{s}.layers.\1.{name}")
        for s, digits in enumerate(PARITY)
        for pattern, name in MOE_KINDS
    ]
    ranks = [
        ("rename", rf"{L}mlp\.experts\.(\d*{r})\.{w}\.", rf"layers.\1.feed_forward.ep{r}.experts.\2.{w}.")
        for w in ("w1", "w2", "w3")
        for r in range(10)
    ]
    return (head + stages + ranks)[:count]


FAMILIES: dict[str, tuple[Callable[[int], dict[str, Shape]], Callable[[int], list[Rule]]]] = {
    "resnet": (resnet_keys, resnet_rules),
    "llm": (llm_keys, llm_rules),
    "moe": (moe_keys, moe_rules),
}


# --------------------------------------------------------------------------- the three implementations


def _as_sub(rule: Rule) -> Rule:
    """A strip_prefix rule as the ``re.sub`` a baseline would write (the prefix occurs once)."""
    return ("rename", "^" + re.escape(rule[1]), "") if rule[0] == "strip_prefix" else rule


def rule_by_rule(state: dict[str, Any], rules: list[Rule]) -> dict[str, Any]:
    """mmengine's ``revise_keys``: each rule in turn over every key."""
    for kind, pattern, *repl in map(_as_sub, rules):
        if kind == "rename":
            state = {re.sub(pattern, repl[0], k): v for k, v in state.items()}
        elif kind == "drop":
            state = {k: v for k, v in state.items() if not re.search(pattern, k)}
        else:  # keep
            state = {k: v for k, v in state.items() if re.search(pattern, k)}
    return state


def first_match(state: dict[str, Any], rules: list[Rule]) -> dict[str, Any]:
    """transformers' ``key_mapping``: per key, the first rule that acts on it, then ``break``."""
    flat = [_as_sub(r) for r in rules]
    out = {}
    for key, value in state.items():
        new: str | None = key
        for kind, pattern, *repl in flat:
            if kind == "rename":
                new, n = re.subn(pattern, repl[0], key)
                if n:
                    break
            elif kind == "drop":
                if re.search(pattern, key):
                    new = None
                    break
            elif not re.search(pattern, key):  # keep
                new = None
                break
        if new is not None:
            out[new] = value
    return out


def remap_rules(rules: list[Rule]) -> dict[str, Any]:
    """The rules as a remap rules dict: one step per rule."""
    steps: list[dict[str, Any]] = []
    for kind, *args in rules:
        if kind == "rename":
            steps.append({"rename": {args[0]: args[1]}})
        else:
            steps.append({kind: args[0]})
    return {"version": 1, "rules": steps}


def remap_mapping(plan: Any) -> dict[str, str]:
    """final name -> source key, from a plan's assignments (every one is 1:1 here)."""
    return {a.target: a.sources[0] for a in plan.assignments}


# --------------------------------------------------------------------------- measuring


def best_time(fn: Callable[[], Any], *, budget: float = 0.5, max_repeats: int = 5) -> tuple[float, Any, int]:
    """(fastest wall time, last result, repeats): repeats until ``budget`` seconds are spent."""
    best, spent, runs, result = float("inf"), 0.0, 0, None
    while runs < max_repeats and (runs == 0 or spent < budget):
        t0 = time.perf_counter()
        result = fn()
        dt = time.perf_counter() - t0
        best, spent, runs = min(best, dt), spent + dt, runs + 1
    return best, result, runs


def _unacted_rules(keys: dict[str, Shape], rules: list[Rule]) -> list[Rule]:
    """Rules that act on no key (they would fail remap's unmatched_step check)."""
    acted = [0] * len(rules)
    flat = [_as_sub(r) for r in rules]
    for key in keys:
        for i, (kind, pattern, *_) in enumerate(flat):
            hit = re.search(pattern, key) is not None
            if hit != (kind == "keep"):
                acted[i] += 1
                break
    return [r for r, n in zip(rules, acted) if n == 0]


def run_case(family: str, n: int, count: int) -> dict[str, Any]:
    """Time the three implementations on one (family, size, rule count); check they agree."""
    import remap
    from remap.meta import source_meta, target_meta

    make_keys, make_rules = FAMILIES[family]
    shapes = make_keys(n)
    rules = make_rules(count)
    assert len(rules) == count, (family, count, len(rules))
    identity = {k: k for k in shapes}  # the value each loop carries is the source key

    t_rbr, by_rule, r_rbr = best_time(lambda: rule_by_rule(identity, rules))
    t_fm, by_first, r_fm = best_time(lambda: first_match(identity, rules))
    target = {new: shapes[old] for new, old in by_rule.items()}
    parsed = remap.parse_rules(remap_rules(rules))
    src_meta, tgt_meta = source_meta(shapes), target_meta(target)
    t_remap, plan, r_remap = best_time(lambda: remap.make_plan(parsed, src_meta, tgt_meta))
    t0 = time.perf_counter()
    records = len(plan.report.targets) + len(plan.report.sources)
    t_records = time.perf_counter() - t0

    problems = []
    if by_rule != by_first:
        problems.append("rule-by-rule and first-match loops disagree")
    if not plan.ok:
        problems.append("remap plan failed: " + "; ".join(f.message[:200] for f in plan.failures[:3]))
    elif remap_mapping(plan) != by_rule:
        problems.append("remap's mapping differs from the loops'")
    lonely = _unacted_rules(shapes, rules)
    if lonely:
        problems.append(f"rules acting on no key: {lonely}")
    return {
        "family": family,
        "keys": len(shapes),
        "rules": count,
        "kept": len(by_rule),
        "seconds": {"remap": t_remap, "rule_by_rule": t_rbr, "first_match": t_fm, "records": t_records},
        "records": records,
        "repeats": {"remap": r_remap, "rule_by_rule": r_rbr, "first_match": r_fm},
        "ratio": {"rule_by_rule/remap": t_rbr / t_remap, "first_match/remap": t_fm / t_remap},
        "remap_us_per_key": 1e6 * t_remap / len(shapes),
        "same_mapping": not problems,
        "problems": problems,
    }


def cases(quick: bool) -> Iterator[tuple[str, int, int]]:
    for n in QUICK_SIZES if quick else FULL_SIZES:
        for family in FAMILIES:
            for count in RULE_COUNTS:
                yield family, n, count


def run(quick: bool, progress: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every case, in order of size; ``progress`` gets one line per case."""
    results = []
    from _measure import ForeignCpu

    for family, n, count in cases(quick):
        with ForeignCpu() as other:
            r = run_case(family, n, count)
        r["other_cores"] = other.cores
        s = r["seconds"]
        progress(
            f"  planning {family:6} {r['keys']:>7,} keys x {count:>2} rules: remap {s['remap']:.3f}s (+{s['records']:.2f}s records)  "
            f"rule-by-rule {s['rule_by_rule']:.3f}s  first-match {s['first_match']:.3f}s  others {other.cores:.2f} cores"
            + ("" if r["same_mapping"] else "  MISMATCH: " + "; ".join(r["problems"]))
        )
        results.append(r)
    return results


if __name__ == "__main__":
    import sys

    run("--quick" in sys.argv)
