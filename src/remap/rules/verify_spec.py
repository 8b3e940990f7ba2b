"""The ``verify:`` section of a rules file: its JSON schema and its parsed form.

Part of the rules language, so that parsing a rules file needs nothing from ``loading``;
running the check is :mod:`remap.verifying`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["VerifySpec", "VERIFY_SCHEMA"]


SHAPE = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
IDS = {"type": "object", "properties": {"ids": SHAPE, "high": {"type": "integer", "minimum": 1}, "low": {"type": "integer"}},
       "required": ["ids", "high"], "additionalProperties": False}  # fmt: skip
ONE_INPUT = {"anyOf": [SHAPE, IDS], "x-expected": "a shape such as [1, 3, 224, 224] or {ids: [1, 16], high: 1000}"}
SELECTOR = {"type": ["string", "integer", "null"]}
VERIFY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "input": {"anyOf": [SHAPE, IDS, {"type": "object", "additionalProperties": ONE_INPUT, "minProperties": 1}],
                  "x-expected": "a shape, {ids: shape, high: n}, or a mapping of input names to those"},
        "output": {"anyOf": [SELECTOR, {"type": "object", "properties": {"source": SELECTOR, "target": SELECTOR},
                                        "additionalProperties": False}],
                   "x-expected": "an output key, attribute or index (logits, 0, hidden_states.2), or {source: ..., target: ...}"},
        "atol": {"type": "number", "minimum": 0},
        "rtol": {"type": "number", "minimum": 0},
        "seed": {"type": "integer"},
    },
    "required": ["input"],
    "additionalProperties": False,
}  # fmt: skip


@dataclass(frozen=True)
class VerifySpec:
    """A parsed ``verify`` section: inputs to make, which outputs to compare, tolerances."""

    inputs: tuple[tuple[str | None, Any], ...]  # (keyword or None for positional, shape | ids spec)
    output: tuple[Any, Any] = (None, None)  # (source selector, target selector)
    atol: float = 1e-5
    rtol: float = 1e-5
    seed: int = 0
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def parse(cls, value: Mapping[str, Any]) -> VerifySpec:
        given = value["input"]
        if isinstance(given, list) or (isinstance(given, Mapping) and "ids" in given):
            inputs: tuple[tuple[str | None, Any], ...] = ((None, given),)
        else:
            inputs = tuple((str(k), v) for k, v in given.items())
        out = value.get("output")
        output = (out.get("source"), out.get("target")) if isinstance(out, Mapping) else (out, out)
        return cls(inputs, output, float(value.get("atol", 1e-5)), float(value.get("rtol", 1e-5)), int(value.get("seed", 0)), dict(value))
