"""``verify``: run the source model and the loaded target on the same input, compare outputs.

The conversion scripts every model hub carries end with a hand-written ``allclose``; here it
is a section of the rules::

    verify:
      input: [1, 3, 224, 224]          # a seeded float tensor; or {ids: [1, 16], high: 1000}
      output: logits                   # which part of the outputs: a key, an attribute or an index
      atol: 1.0e-5

Several named inputs: ``input: {input_ids: {ids: [1, 16], high: 1000}, pixel_values: [1, 3, 32, 32]}``.
``output`` may differ per side: ``{source: logits, target: 0}``.

>>> from remap.verifying.inputs import make_inputs
>>> spec = VerifySpec.parse({"input": {"ids": [1, 4], "high": 10}, "output": "logits"})
>>> spec.output
('logits', 'logits')
>>> make_inputs(spec)[0][0].dtype
torch.int64
"""

from __future__ import annotations

from typing import Any

from ..errors import UsageError
from ..rules.verify_spec import VerifySpec
from .compare import compare
from .inputs import make_inputs, select_output

__all__ = ["run_verify"]


def run_verify(spec: VerifySpec, source_model: Any, target_model: Any) -> dict[str, Any]:
    """Run both models in eval mode, without gradients, on the same seeded inputs; compare."""
    import torch

    args, kwargs = make_inputs(spec)
    outputs = []
    for side, model in (("source", source_model), ("target", target_model)):
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(*[a.clone() for a in args], **{k: v.clone() for k, v in kwargs.items()})
        except Exception as exc:  # the user's model raising on the declared input
            raise UsageError(f"verify: the {side} model failed on the verify input: {type(exc).__name__}: {exc}") from None
        finally:
            model.train(was_training)
        outputs.append(select_output(out, spec.output[0 if side == "source" else 1], side))
    result = compare(*outputs, atol=spec.atol, rtol=spec.rtol)
    return {**result, "atol": spec.atol, "rtol": spec.rtol, "input": dict(spec.raw).get("input"), "output": list(spec.output)}


