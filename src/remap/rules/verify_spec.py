"""The ``verify:`` section of a rules file: its JSON schema and its parsed form.

Part of the rules language, so that parsing a rules file needs nothing from ``loading``;
running the check is :mod:`remap.verifying`. Every field::

    verify:
      input: [1, 3, 224, 224]     # a shape (seeded floats), {ids: [1, 16], high: 1000}, a mapping of
                                  # input names to those, or {file: sample.safetensors} (tensors named
                                  # by input name, or 0, 1, ... for positional inputs)
      output: logits              # a key, attribute or index; or {source: ..., target: ...}
      atol: 1.0e-5                # per output; when left out, a default from the run's precision
      rtol: 1.0e-5
      seed: 0                     # or seeds: [0, 1, 2]: one run each, the verdict over all
      dtype: bfloat16             # the precision the target runs in (its loaded dtype; checked)
      device: cuda                # where both models run (the source model is moved there for the run)
      task: causal_lm             # or classifier: sensible default metrics (below)
      metrics: {kl: 1.0e-4, top1: 0.99, greedy: 8}    # or {topk: {k: 5, min: 0.99}} for classifiers
      uncovered: ['head\\.bias']  # regexes: loaded tensors allowed not to influence the outputs
      reference: ref.safetensors  # recorded inputs and source outputs; `input` may then be left out

A rule the schema cannot say in one field (``input`` unless ``reference``; ``seed`` or
``seeds``; one input file and several seeds) is still a schema rule, so its error names the
file, line and column like every other.

>>> spec = VerifySpec.parse({"input": {"ids": [1, 8], "high": 50}, "task": "causal_lm", "seeds": [0, 1]})
>>> spec.seeds, sorted(spec.metrics)
((0, 1), ['greedy', 'kl', 'top1'])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["VerifySpec", "VERIFY_SCHEMA", "DTYPES", "TASKS"]

DTYPES = ("bfloat16", "float16", "float32", "float64")
TASKS = ("causal_lm", "classifier")

SHAPE = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
IDS = {"type": "object", "properties": {"ids": SHAPE, "high": {"type": "integer", "minimum": 1}, "low": {"type": "integer"}},
       "required": ["ids", "high"], "additionalProperties": False}  # fmt: skip
FILE = {"type": "object", "properties": {"file": {"type": "string", "minLength": 1}}, "required": ["file"], "additionalProperties": False}
ONE_INPUT = {"anyOf": [SHAPE, IDS], "x-expected": "a shape such as [1, 3, 224, 224] or {ids: [1, 16], high: 1000}"}
SELECTOR = {"type": ["string", "integer", "null"]}
SHARE = {"type": "number", "minimum": 0, "maximum": 1}
COUNT = {"type": "integer", "minimum": 1}
METRICS = {
    "type": "object",
    "properties": {
        "kl": {"type": "number", "minimum": 0, "x-expected": "the largest KL divergence allowed at any position, such as 1.0e-4"},
        "top1": SHARE,
        "greedy": {"anyOf": [COUNT, {"type": "object", "properties": {"tokens": COUNT, "min": {"type": "integer", "minimum": 0}},
                                     "required": ["tokens"], "additionalProperties": False}],
                   "x-expected": "a number of tokens such as 8, or {tokens: 8, min: 6}"},
        "topk": {"type": "object", "properties": {"k": COUNT, "min": SHARE}, "required": ["k"], "additionalProperties": False},
    },
    "additionalProperties": False,
    "minProperties": 1,
}  # fmt: skip
INPUT_IS_A_FILE = {"properties": {"input": {"type": "object", "properties": {"file": {"type": "string"}}, "required": ["file"]}},
                   "required": ["input"]}  # fmt: skip
VERIFY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "input": {"anyOf": [SHAPE, IDS, FILE, {"type": "object", "additionalProperties": ONE_INPUT, "minProperties": 1}],
                  "x-expected": "a shape, {ids: shape, high: n}, {file: inputs.safetensors}, or a mapping of input names to shapes"},
        "output": {"anyOf": [SELECTOR, {"type": "object", "properties": {"source": SELECTOR, "target": SELECTOR},
                                        "additionalProperties": False}],
                   "x-expected": "an output key, attribute or index (logits, 0, hidden_states.2), or {source: ..., target: ...}"},
        "atol": {"type": "number", "minimum": 0},
        "rtol": {"type": "number", "minimum": 0},
        "seed": {"type": "integer"},
        "seeds": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
        "dtype": {"enum": list(DTYPES)},
        "device": {"type": "string", "pattern": r"^(cpu|cuda|mps|xpu|hpu|npu)(:[0-9]+)?$",
                   "x-expected": "a device such as cpu, cuda or cuda:1"},
        "task": {"enum": list(TASKS)},
        "metrics": METRICS,
        "uncovered": {"type": ["string", "array"], "items": {"type": "string"}, "x-regex": True},
        "reference": {"type": "string", "minLength": 1},
    },
    "additionalProperties": False,
    "allOf": [
        {"if": {"not": {"required": ["reference"]}}, "then": {"required": ["input"]}},
        {"if": INPUT_IS_A_FILE, "then": {"properties": {"seeds": {"type": "null", "x-expected": (
            "no 'seeds' with inputs from a file (every seed would run the same input)")}}}},
    ],
    "dependentSchemas": {"seeds": {"properties": {"seed": {"type": "null", "x-expected": "no 'seed' beside 'seeds' (list every seed in 'seeds')"}}}},
}  # fmt: skip

DEFAULT_TOL = 1e-5  # atol and rtol for a float32 or float64 run when the rules give none


@dataclass(frozen=True)
class VerifySpec:
    """A parsed ``verify`` section: inputs to make (or the file they come from), which outputs
    to compare, tolerances (``atol_given``/``rtol_given`` say whether the rules set them; if not,
    :func:`remap.verifying.metrics.default_tolerances` picks them from the run's precision),
    seeds, the target's dtype and the device, metrics (normalised: ``greedy`` and ``topk`` as
    mappings, a ``task``'s defaults filled in where the rules give none).
    """

    inputs: tuple[tuple[str | None, Any], ...]  # (keyword or None for positional, shape | ids spec); () from a file or reference
    output: tuple[Any, Any] = (None, None)  # (source selector, target selector)
    atol: float = DEFAULT_TOL
    rtol: float = DEFAULT_TOL
    seed: int = 0  # the first of ``seeds``
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)
    seeds: tuple[int, ...] = (0,)
    input_file: str | None = None  # as written; relative to the rules file's folder
    atol_given: bool = False
    rtol_given: bool = False
    dtype: str | None = None
    device: str | None = None
    task: str | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)  # kl, top1, greedy {tokens, min}, topk {k, min}
    metrics_given: tuple[str, ...] = ()  # the metric names the rules wrote (the rest came from ``task``)
    uncovered: tuple[str, ...] = ()
    reference: str | None = None

    @classmethod
    def parse(cls, value: Mapping[str, Any]) -> VerifySpec:
        """A schema-checked ``verify`` mapping as a VerifySpec.

        >>> VerifySpec.parse({"input": {"file": "x.safetensors"}}).input_file
        'x.safetensors'
        >>> VerifySpec.parse({"input": [2, 3], "metrics": {"greedy": 4}}).metrics
        {'greedy': {'tokens': 4, 'min': 4}}
        """
        given = value.get("input")
        input_file = None
        inputs: tuple[tuple[str | None, Any], ...] = ()
        if isinstance(given, Mapping) and isinstance(given.get("file"), str):
            input_file = given["file"]
        elif isinstance(given, list) or (isinstance(given, Mapping) and "ids" in given):
            inputs = ((None, given),)
        elif isinstance(given, Mapping):
            inputs = tuple((str(k), v) for k, v in given.items())
        out = value.get("output")
        output = (out.get("source"), out.get("target")) if isinstance(out, Mapping) else (out, out)
        seeds = tuple(int(s) for s in value.get("seeds", [value.get("seed", 0)]))
        metrics = _metrics(value.get("metrics", {}))
        task = value.get("task")
        defaults = {k: v for k, v in task_metrics(task).items() if k not in metrics}
        uncovered = value.get("uncovered", ())
        return cls(
            inputs, output, float(value.get("atol", DEFAULT_TOL)), float(value.get("rtol", DEFAULT_TOL)), seeds[0], dict(value),
            seeds=seeds, input_file=input_file, atol_given="atol" in value, rtol_given="rtol" in value, dtype=value.get("dtype"),
            device=value.get("device"), task=task, metrics={**metrics, **defaults}, metrics_given=tuple(metrics),
            uncovered=(uncovered,) if isinstance(uncovered, str) else tuple(uncovered), reference=value.get("reference"),
        )  # fmt: skip


def _metrics(given: Mapping[str, Any]) -> dict[str, Any]:
    """The ``metrics`` mapping with ``greedy`` and ``topk`` as full mappings.

    >>> _metrics({"greedy": 8, "topk": {"k": 5}})
    {'greedy': {'tokens': 8, 'min': 8}, 'topk': {'k': 5, 'min': 1.0}}
    """
    out: dict[str, Any] = {}
    for name, value in given.items():
        if name == "greedy":
            tokens = value if isinstance(value, int) else value["tokens"]
            out[name] = {"tokens": int(tokens), "min": int(value.get("min", tokens) if isinstance(value, Mapping) else tokens)}
        elif name == "topk":
            out[name] = {"k": int(value["k"]), "min": float(value.get("min", 1.0))}
        else:
            out[name] = float(value)
    return out


def task_metrics(task: str | None) -> dict[str, Any]:
    """The metrics a ``task`` chooses (thresholds for a float32 run; a lower-precision run
    loosens them, see :func:`remap.verifying.metrics.thresholds_for`).

    >>> task_metrics("classifier")
    {'top1': 1.0, 'topk': {'k': 5, 'min': 1.0}}
    >>> task_metrics(None)
    {}
    """
    if task == "causal_lm":
        return {"kl": 1e-4, "top1": 1.0, "greedy": {"tokens": 8, "min": 8}}
    if task == "classifier":
        return {"top1": 1.0, "topk": {"k": 5, "min": 1.0}}
    return {}
