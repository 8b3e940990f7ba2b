"""``verify`` with a Hugging Face checkpoint whose tied weights are saved once.

``save_pretrained`` writes ``transformer.wte.weight`` and leaves out ``lm_head.weight``,
which is the same Parameter. Building the source model for ``verify`` must load it the
way the target side does: a tied alias is not missing. Nothing else is excused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conversion_models import GPT
from safetensors.torch import load_file, save_file
from weights import perturb

import remap
from remap.cli import main
from remap.errors import SourceError, UsageError
from remap.sources.readers import open_source
from remap.verifying.source_model import load_source_weights, tied_aliases

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CONFIG = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)


def tiny_gpt2(tie: bool = True):
    """A small transformers GPT2LMHeadModel; lm_head tied to the token embedding unless ``tie`` is false."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(**CONFIG, tie_word_embeddings=tie))


def untied_gpt2():
    return tiny_gpt2(tie=False)


def small_gpt():
    return GPT(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2)


def saved_pretrained(tmp_path: Path, tie: bool = True) -> Path:
    """A ``save_pretrained`` folder of a tiny GPT-2 with non-trivial weights."""
    folder = tmp_path / "gpt2_hf"
    model = perturb(tiny_gpt2(tie), seed=5)
    model.save_pretrained(folder)
    return folder


def rules_file(tmp_path: Path, source: dict) -> Path:
    rules = yaml.safe_load((CONFIGS / "hf-gpt2-to-linear.yaml").read_text())
    rules.update(source=source, verify={"input": {"ids": [2, 8], "high": 50}, "output": {"source": "logits", "target": None}, "atol": 1e-4})
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    return path


def test_the_checkpoint_leaves_out_the_tied_head_and_the_model_ties_it(tmp_path):
    """The premise, from the real library: the file lacks lm_head.weight, the model shares one Parameter."""
    folder = saved_pretrained(tmp_path)
    keys = set(load_file(str(folder / "model.safetensors")))
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert tied_aliases(model) == {"lm_head.weight": "transformer.wte.weight"}
    assert tied_aliases(untied_gpt2()) == {}


def test_apply_verify_passes_on_a_save_pretrained_gpt2(tmp_path, capsys):
    folder = saved_pretrained(tmp_path)
    rules = rules_file(tmp_path, {"path": str(folder), "model": "tests.verifying.test_source_model:tiny_gpt2"})
    report = tmp_path / "report.json"
    code = main(["apply", str(rules), "--target", "tests.verifying.test_source_model:small_gpt", "--verify", "--report", str(report), "-q"])
    assert code == 0, capsys.readouterr().err
    verify = json.loads(report.read_text())["verify"]
    assert verify["ok"] and verify["tensors"] == 1 and verify["max_abs"] < 1e-4


def test_the_tied_head_is_loaded_from_the_embedding(tmp_path):
    """load_source_weights loads the embedding, so the tied head holds the checkpoint's values."""
    folder = saved_pretrained(tmp_path)
    model = tiny_gpt2()
    with open_source(folder) as src:
        excused = load_source_weights(model, src, what="source.model tiny")
        expected = src.read("transformer.wte.weight")
    assert excused == {"lm_head.weight": "transformer.wte.weight"}
    assert torch.equal(model.lm_head.weight, expected) and model.lm_head.weight is model.transformer.wte.weight
    reference = perturb(tiny_gpt2(), seed=5)  # the model that was saved, rebuilt the same way
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())


def test_an_untied_head_left_out_is_missing(tmp_path):
    """Two Parameters that are not the same object are not excused, even in one model."""
    folder = saved_pretrained(tmp_path, tie=False)
    state = load_file(str(folder / "model.safetensors"))
    assert "lm_head.weight" in state  # an untied model saves its head
    del state["lm_head.weight"]
    save_file(state, str(tmp_path / "headless.safetensors"))
    with open_source(tmp_path / "headless.safetensors") as src, pytest.raises(UsageError) as info:
        load_source_weights(untied_gpt2(), src, what="source.model untied")
    assert str(info.value) == (
        "verify: the source weights do not load strictly into source.model untied: 1 missing key(s): lm_head.weight; "
        "source.model must build the architecture the checkpoint was saved from"
    )


def test_other_missing_and_unexpected_keys_still_fail_through_the_cli(tmp_path, capsys):
    folder = saved_pretrained(tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    state["transformer.extra.weight"] = state.pop("transformer.ln_f.weight")
    path = tmp_path / "renamed.safetensors"
    save_file(state, str(path))
    rules = rules_file(tmp_path, {"path": str(path), "model": "tests.verifying.test_source_model:tiny_gpt2"})
    rules_data = yaml.safe_load(rules.read_text())
    rules_data["rules"].append({"rename": {r"^transformer\.extra\.": "transformer.ln_f."}})  # the target side loads it
    rules.write_text(yaml.safe_dump(rules_data))
    capsys.readouterr()  # save_pretrained's progress bar
    code = main(["apply", str(rules), "--target", "tests.verifying.test_source_model:small_gpt", "--verify", "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        f"remap: error: verify: the source weights do not load strictly into source.model tests.verifying.test_source_model:tiny_gpt2 (from {path}): "
        "1 missing key(s): transformer.ln_f.weight; 1 unexpected key(s): transformer.extra.weight "
        "(tied parameters, which may be saved under one name: lm_head.weight = transformer.wte.weight); "
        "source.model must build the architecture the checkpoint was saved from\n"
    )


def test_tied_copies_that_differ_fail(tmp_path):
    """A checkpoint holding both names of one tied parameter, with different tensors, is refused."""
    state = {k: v.clone() for k, v in perturb(tiny_gpt2(), seed=6).state_dict().items()}
    state["lm_head.weight"] = state["lm_head.weight"] + 1  # state_dict() gives both names; now they differ
    torch.save(state, tmp_path / "both.pth")
    with open_source(tmp_path / "both.pth") as src, pytest.raises(UsageError) as info:
        load_source_weights(tiny_gpt2(), src, what="source.model tiny")
    assert str(info.value) == (
        "verify: the source weights do not load into source.model tiny: transformer.wte.weight and lm_head.weight are one tied "
        "parameter there, but the checkpoint holds different tensors under these names"
    )


def test_tied_copies_that_agree_load(tmp_path):
    state = perturb(tiny_gpt2(), seed=7).state_dict()
    torch.save(state, tmp_path / "both.pth")
    model = tiny_gpt2()
    with open_source(tmp_path / "both.pth") as src:
        assert load_source_weights(model, src, what="source.model tiny") == {}
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"])


def state_factory():
    return tiny_gpt2().state_dict()


def test_a_source_model_that_is_no_module_is_named(tmp_path):
    folder = saved_pretrained(tmp_path)
    rules = yaml.safe_load(rules_file(tmp_path, {"path": str(folder), "model": "tests.verifying.test_source_model:state_factory"}).read_text())
    with pytest.raises(SourceError) as info:
        remap.load(small_gpt(), None, rules=rules, verify=True)
    assert str(info.value) == "source.model: tests.verifying.test_source_model:state_factory() returned a OrderedDict, expected a torch.nn.Module"
    assert info.value.exit_code == 3
