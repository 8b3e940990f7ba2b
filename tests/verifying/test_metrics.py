"""Metrics that fit the model (issue 17, item 4): KL of next-token distributions, top-1 and
top-k agreement, greedy decoding token by token; tolerances and thresholds for the run's
precision; several seeds. References come from torch (``kl_div``, ``topk``), a hand
computation and Hugging Face's own ``generate``, never from the code under test."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from remap.errors import UsageError
from remap.rules.verify_spec import VerifySpec
from remap.verifying.metrics import compare_greedy, greedy_decode, kl_divergence, top1_agreement, topk_agreement
from remap.verifying.run import run_verify

LM = {"input": {"ids": [2, 6], "high": 50}, "output": "logits"}


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # logits far from uniform, so that a perturbation moves the argmax and bf16 rounding matters
        model.transformer.wte.weight.mul_(20)
    return model


def test_kl_matches_torch_kl_div_and_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    p, q = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    reference = torch.nn.functional.kl_div(q, p, reduction="none", log_target=True).sum(-1)  # KL(P || Q), P the source
    mean, worst = kl_divergence(a, b)
    assert math.isclose(mean, float(reference.mean()), rel_tol=1e-12) and math.isclose(worst, float(reference.max()), rel_tol=1e-12)
    # two classes: P = (1/2, 1/2), Q = softmax(0, 1) = (1, e) / (1 + e)
    q1 = 1 / (1 + math.e)
    hand = 0.5 * math.log(0.5 / q1) + 0.5 * math.log(0.5 / (1 - q1))
    assert math.isclose(kl_divergence(torch.zeros(1, 2), torch.tensor([[0.0, 1.0]]))[1], hand, rel_tol=1e-12)


def test_kl_of_bf16_logits_is_taken_in_float64():
    a = torch.randn(4, 11)
    assert kl_divergence(a.bfloat16(), a.bfloat16()) == (0.0, 0.0)
    assert kl_divergence(a, a.bfloat16())[1] > 0


def test_top1_and_topk_agreement_against_torch_topk():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    expected_top1 = sum(int(x.argmax() == y.argmax()) for x, y in zip(a, b)) / 6
    assert top1_agreement(a, b) == pytest.approx(expected_top1)
    for k in (1, 3, 10):
        shared = [len(set(x.topk(k).indices.tolist()) & set(y.topk(k).indices.tolist())) / k for x, y in zip(a, b)]
        assert topk_agreement(a, b, k) == pytest.approx(sum(shared) / len(shared))
    assert topk_agreement(a, b, 10) == 1.0
    with pytest.raises(UsageError, match="k is 11, but the outputs have 10 classes"):
        topk_agreement(a, b, 11)


def test_greedy_decoding_matches_hugging_face_generate(gpt2):
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(3))
    expected = gpt2.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)[:, 6:]
    got = greedy_decode(gpt2, ids, 5, name=None, selector="logits", side="source")
    assert torch.equal(got, expected)
    assert compare_greedy(got, got) == (5, None)
    other = got.clone()
    other[1, 3] += 1
    assert compare_greedy(got, other) == (3, 3)


def test_the_same_weights_agree_on_every_metric(gpt2):
    spec = VerifySpec.parse({**LM, "task": "causal_lm", "metrics": {"greedy": 4}})
    result = run_verify(spec, gpt2, copy.deepcopy(gpt2))
    m = result["metrics"]
    assert result["outcome"] == "agree" and result["ok"] and result["verdict_by"] == "metrics"
    assert m["kl"] == 0.0 and m["top1_agreement"] == 1.0 and (m["greedy_match"], m["greedy_first_mismatch"]) == (4, None)
    assert m["thresholds"] == {"kl": 1e-4, "top1": 1.0, "greedy": {"tokens": 4, "min": 4}}
    assert m["why"] == {"greedy": "given in the rules", "kl": "default of task causal_lm", "top1": "default of task causal_lm"}
    assert result["tolerances"]["why"] == "atol 1e-05, rtol 1e-05: defaults for a float32 run; none given in the rules"


def test_a_bf16_copy_is_close_with_tolerances_that_say_so(gpt2):
    spec = VerifySpec.parse({**LM, "task": "causal_lm", "metrics": {"greedy": 4}})
    result = run_verify(spec, gpt2, copy.deepcopy(gpt2).to(torch.bfloat16))
    m = result["metrics"]
    assert result["dtypes"] == {"source": "float32", "target": "bfloat16", "precision": "bfloat16", "compared_in": "float64"}
    assert (result["atol"], result["rtol"]) == (0.125, 0.125)
    assert result["tolerances"]["why"] == ("atol 0.125, rtol 0.125: defaults for a bfloat16 run (16 × its epsilon 0.0078125); "
                                           "none given in the rules")  # fmt: skip
    assert 0 < m["kl"] < 1e-2 and m["top1_agreement"] >= 0.9
    assert m["thresholds"]["kl"] == 1e-2 and m["why"]["kl"] == "default of task causal_lm, loosened for a bfloat16 run"
    assert result["outcome"] == "agree" and result["max_abs"] > 1e-3  # fp32 tolerances would have failed it
    assert not run_verify(VerifySpec.parse({**LM, "atol": 1e-5, "rtol": 1e-5}), gpt2, copy.deepcopy(gpt2).bfloat16())["ok"]


def test_one_perturbed_layer_fails_the_metrics(gpt2):
    target = copy.deepcopy(gpt2)
    with torch.no_grad():
        target.transformer.h[1].mlp.c_fc.weight.add_(torch.randn(target.transformer.h[1].mlp.c_fc.weight.shape, generator=torch.Generator().manual_seed(5)))
    result = run_verify(VerifySpec.parse({**LM, "metrics": {"kl": 1e-3, "top1": 0.99, "greedy": 4}}), gpt2, target)
    m = result["metrics"]
    assert result["outcome"] == "differ" and not result["ok"]
    assert m["passed"] == {"kl": False, "top1": False, "greedy": False} and m["kl"] > 1e-3 and m["greedy_match"] < 4
    assert m["greedy_first_mismatch"] == m["greedy_match"]


def test_metrics_replace_default_tolerances_but_not_given_ones(gpt2):
    target = copy.deepcopy(gpt2).bfloat16()
    loose = run_verify(VerifySpec.parse({**LM, "metrics": {"kl": 0.01}}), gpt2, target)
    assert loose["verdict_by"] == "metrics" and loose["ok"]
    strict = run_verify(VerifySpec.parse({**LM, "metrics": {"kl": 0.01}, "atol": 1e-6, "rtol": 0}), gpt2, target)
    assert strict["verdict_by"] == "tolerances and metrics" and strict["metrics"]["ok"] and not strict["close"]
    assert strict["outcome"] == "differ"


def test_classifier_topk_and_several_seeds():
    torch.manual_seed(0)
    source = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    spec = VerifySpec.parse({"input": [4, 8], "task": "classifier", "seeds": [0, 1, 2]})
    result = run_verify(spec, source, copy.deepcopy(source))
    assert result["outcome"] == "agree" and result["seeds"] == [0, 1, 2] and [r["seed"] for r in result["runs"]] == [0, 1, 2]
    assert result["metrics"]["topk_agreement"] == {"5": 1.0} and result["metrics"]["positions"] == 12
    target = copy.deepcopy(source)
    with torch.no_grad():
        target[2].bias[3] += 5.0  # class 3 now wins often, on some seeds' rows only
    result = run_verify(spec, source, target)
    per_run = [r["metrics"]["top1_agreement"] for r in result["runs"]]
    assert result["outcome"] == "differ" and result["metrics"]["top1_agreement"] == min(per_run) < 1.0
    assert result["max_abs"] == max(r["max_abs"] for r in result["runs"])
    assert result["worst_seed"] == max(result["runs"], key=lambda r: r["max_abs"])["seed"]


def test_greedy_needs_one_input_of_token_ids():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(UsageError, match=r"verify.metrics.greedy grows one input of token ids, \[batch, length\] integers .*positional \[2, 4\] float32"):
        run_verify(VerifySpec.parse({"input": [2, 4], "metrics": {"greedy": 2}}), model, copy.deepcopy(model))


def test_metrics_need_logits():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(UsageError, match="the source model's output is a dict without logits: choose the logits with verify.output"):
        run_verify(VerifySpec.parse({"input": [2, 4], "metrics": {"kl": 1}}), _Dict(model), _Dict(model))


class _Dict(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return {"hidden": self.inner(x)}


def test_dtype_and_device_are_checked_not_cast():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(UsageError, match="verify.dtype is bfloat16, but the target's parameters are float32: verify runs the target as it was loaded"):
        run_verify(VerifySpec.parse({"input": [2, 4], "dtype": "bfloat16"}), model, copy.deepcopy(model))
    with pytest.raises(UsageError, match="verify.device is cuda, but the target was loaded on cpu"):
        run_verify(VerifySpec.parse({"input": [2, 4], "device": "cuda"}), model, copy.deepcopy(model))
    result = run_verify(VerifySpec.parse({"input": [2, 4], "dtype": "float32", "device": "cpu"}), model, copy.deepcopy(model))
    assert result["ok"] and result["devices"] == {"source": "cpu", "target": "cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_cuda_target_against_a_cpu_source_model_on_cuda(gpt2):
    source = copy.deepcopy(gpt2)
    target = copy.deepcopy(gpt2).to("cuda", torch.bfloat16)
    result = run_verify(VerifySpec.parse({**LM, "task": "causal_lm", "device": "cuda", "dtype": "bfloat16"}), source, target)
    assert result["devices"] == {"source": "cuda:0", "target": "cuda:0"} and result["outcome"] == "agree"
    assert next(source.parameters()).device.type == "cpu"  # moved back
