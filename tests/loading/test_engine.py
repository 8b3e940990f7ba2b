"""The engine: loads what the plan says, touches nothing when a check fails, freezes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from weights import Small, Tied, perturb, snapshot

import remap
from remap.errors import CheckError, InternalError, SourceError, UsageError
from remap.sources.readers import open_source

PREFIX = {"version": 1, "rules": [{"strip_prefix": "module."}]}


def ddp_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"module.{k}": v.clone() for k, v in model.state_dict().items()}


def test_load_copies_every_tensor_and_reports_it():
    src = perturb(Small(), seed=1)
    dst = perturb(Small(), seed=2)
    report = remap.load(dst, ddp_state(src), rules=PREFIX)
    assert report.ok and not report.dry_run
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key
    assert report.totals.loaded == len(src.state_dict()) == report.totals.target_keys
    assert report.target_record("fc.weight").sources == ("module.fc.weight",)
    assert report.target_record("fc.weight").steps == ("step 1 (strip_prefix)",)


@pytest.mark.parametrize(
    "rules, kinds",
    [
        ({"version": 1}, {"missing", "unused"}),  # forgot the module. prefix
        ({"version": 1, "rules": [{"strip_prefix": "module."}, {"drop": "^fc\\."}]}, {"missing"}),
        ({"version": 1, "rules": [{"strip_prefix": "module."}, {"drop": "^nothing"}]}, {"unmatched_step"}),
        ({**PREFIX, "expect": {"min_loaded": 1.0, "missing": "^fc\\."}, "rules": [{"strip_prefix": "module."}, {"drop": "^fc\\."}]}, {"min_loaded"}),
        ({**PREFIX, "freeze": {"params": "^backbone\\."}}, {"freeze"}),
        # every key declared away: a load of nothing fails unless the rules say min_loaded: 0
        ({"version": 1, "rules": [{"drop": "."}], "expect": {"missing": "."}}, {"min_loaded"}),
    ],
)
def test_failed_check_leaves_module_byte_identical(rules, kinds):
    dst = perturb(Small(), seed=2)
    before = snapshot(dst)
    with pytest.raises(CheckError) as info:
        remap.load(dst, ddp_state(perturb(Small(), seed=1)), rules=rules)
    assert {f.kind for f in info.value.report.failures} == kinds
    assert info.value.exit_code == 1
    assert snapshot(dst) == before


def test_shape_mismatch_is_an_error_by_default_and_names_both_shapes():
    dst = Small(num_classes=3)
    before = snapshot(dst)
    with pytest.raises(CheckError) as info:
        remap.load(dst, ddp_state(perturb(Small(num_classes=5))), rules=PREFIX)
    (failure,) = info.value.report.failures
    assert failure.kind == "shape_mismatch"
    assert failure.keys == ("fc.weight", "fc.bias")
    assert "fc.weight: checkpoint [5, 4] (from 'module.fc.weight') vs model [3, 4]" in failure.message
    assert snapshot(dst) == before


def test_shapes_skip_for_a_declared_head_loads_the_rest():
    src = perturb(Small(num_classes=5), seed=1)
    dst = perturb(Small(num_classes=3), seed=2)
    head = dst.fc.weight.detach().clone()
    rules = {**PREFIX, "shapes": {"skip": "^fc\\."}, "expect": {"missing": "^fc\\."}}
    report = remap.load(dst, ddp_state(src), rules=rules)
    assert report.keys_with("mismatched") == ["fc.weight", "fc.bias"]
    rec = report.target_record("fc.weight")
    assert (rec.shape, rec.source_shape, rec.declared) == ((3, 4), (5, 4), True)
    assert torch.equal(dst.fc.weight, head)
    assert torch.equal(dst.conv.weight, src.conv.weight)
    assert report.source_record("module.fc.weight").fate == "skipped"


def test_skipped_shape_still_counts_as_missing_for_expect():
    rules = {**PREFIX, "shapes": "skip"}
    with pytest.raises(CheckError) as info:
        remap.load(Small(num_classes=3), ddp_state(Small(num_classes=5)), rules=rules)
    assert [f.kind for f in info.value.report.failures] == ["missing"]
    assert info.value.report.failures[0].keys == ("fc.weight", "fc.bias")


class FailingSource:
    """A source whose third tensor cannot be read, as a truncated file would fail."""

    def __init__(self, state):
        self.inner = open_source(state)
        self.meta, self.description, self.reads = self.inner.meta, {"kind": "test"}, 0

    def span(self, key):
        return None  # no file bytes to map: the engine reads everything before writing

    def read(self, key):
        self.reads += 1
        if self.reads == 3:
            raise SourceError(f"cannot read {key!r}: truncated")
        return self.inner.read(key)

    def close(self):
        pass


def test_a_read_failure_midway_leaves_module_untouched(monkeypatch):
    from remap import api

    dst = perturb(Small(), seed=2)
    before = snapshot(dst)
    failing = FailingSource(ddp_state(perturb(Small(), seed=1)))
    monkeypatch.setattr(api, "open_rules_source", lambda *a, **k: failing)
    with pytest.raises(SourceError, match="truncated"):
        remap.load(dst, None, rules=PREFIX)
    assert failing.reads == 3
    assert snapshot(dst) == before


def test_dry_run_reads_nothing_and_touches_nothing(monkeypatch):
    dst = perturb(Small(), seed=2)
    before = snapshot(dst)
    src = open_source(ddp_state(perturb(Small(), seed=1)))
    monkeypatch.setattr(src, "read", lambda key: pytest.fail(f"dry run read {key}"))
    report = remap.load(dst, src, rules=PREFIX, dry_run=True)
    assert report.ok and report.dry_run and report.totals.loaded == 8
    assert snapshot(dst) == before


def test_plan_then_apply_and_explain():
    src, dst = perturb(Small(), seed=1), Small()
    plan = remap.plan(dst, ddp_state(src), PREFIX)
    assert plan.explain("fc.bias") == (
        "target 'fc.bias' [5] float32 parameter: loaded, trainable\n"
        "  from source 'module.fc.bias' [5] float32\n"
        "    step 1 (strip_prefix 'module.'): -> 'fc.bias'\n"
        "    => loaded into 'fc.bias'"
    )
    report = plan.apply(dst)
    assert report.ok and torch.equal(dst.fc.bias, src.fc.bias)


def test_apply_to_another_module_than_planned_is_refused():
    plan = remap.plan(Small(), ddp_state(Small()), PREFIX)
    other = Small(num_classes=3)
    with pytest.raises(UsageError, match=r"shapes differ: fc.weight: planned \[5, 4\], module \[3, 4\]"):
        plan.apply(other)


def test_metadata_only_plan_cannot_apply():
    shapes = {f"module.{k}": tuple(v.shape) for k, v in Small().state_dict().items()}
    plan = remap.plan(Small(), shapes, PREFIX)
    assert plan.ok
    with pytest.raises(UsageError, match="metadata only"):
        plan.apply(Small())


# --------------------------------------------------------------------------- freezing

FREEZE = {**PREFIX, "freeze": {"params": ".*", "except": "^fc\\."}}


def test_freeze_params_except_head():
    dst = Small()
    report = remap.load(dst, ddp_state(perturb(Small())), rules=FREEZE)
    grads = {k: p.requires_grad for k, p in dst.named_parameters()}
    assert grads == {"conv.weight": False, "bn.weight": False, "bn.bias": False, "fc.weight": True, "fc.bias": True}
    assert (report.totals.frozen_params, report.totals.trainable_params) == (3, 2)
    assert report.totals.trainable_elements == 4 * 5 + 5


def _train_forward(model: nn.Module) -> None:
    model.train()
    model(torch.randn(2, 3, 8, 8))


def test_batchnorm_eval_stays_in_eval_after_train():
    dst = Small()
    remap.load(dst, ddp_state(perturb(Small())), rules={**FREEZE, "freeze": {**FREEZE["freeze"], "batchnorm": "eval"}})
    stats = (dst.bn.running_mean.clone(), dst.bn.running_var.clone(), dst.bn.num_batches_tracked.clone())
    _train_forward(dst)
    assert dst.training and not dst.bn.training
    assert torch.equal(dst.bn.running_mean, stats[0]) and torch.equal(dst.bn.running_var, stats[1])
    assert torch.equal(dst.bn.num_batches_tracked, stats[2])
    dst.eval()
    dst.train()
    assert not dst.bn.training


def test_batchnorm_frozen_becomes_frozen_batchnorm_with_loaded_values():
    from torchvision.ops.misc import FrozenBatchNorm2d

    src = perturb(Small(), seed=3).eval()
    dst = Small()
    report = remap.load(dst, ddp_state(src), rules={**FREEZE, "freeze": {**FREEZE["freeze"], "batchnorm": "frozen"}})
    assert isinstance(dst.bn, FrozenBatchNorm2d)
    assert report.freeze.batchnorm_modules == ("bn",)
    x = torch.randn(2, 3, 8, 8)
    _train_forward(dst)
    assert torch.allclose(dst(x), src(x), atol=1e-5)  # train mode, yet identical to the source in eval
    assert report.target_record("bn.weight").trainable is False


def test_batchnorm_with_no_params_pattern_applies_to_every_batchnorm():
    dst = Small()
    report = remap.load(dst, ddp_state(perturb(Small())), rules={**PREFIX, "freeze": {"batchnorm": "eval"}})
    assert report.freeze.batchnorm_modules == ("bn",)
    assert all(p.requires_grad for p in dst.parameters())
    dst.train()
    assert not dst.bn.training


def test_batchnorm_frozen_refuses_1d_batchnorm_before_loading():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    before = snapshot(model)
    state = {k: v.clone() for k, v in perturb(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))).state_dict().items()}
    with pytest.raises(CheckError) as info:
        remap.load(model, state, rules={"version": 1, "freeze": {"params": ".*", "batchnorm": "frozen"}})
    assert info.value.report.failures[0].message.startswith(
        "freeze.batchnorm: frozen replaces BatchNorm2d with FrozenBatchNorm2d; these are not 2-d: 1 (BatchNorm1d)."
    )
    assert snapshot(model) == before


def test_frozen_model_still_pickles():
    import copy
    import pickle

    dst = Small()
    remap.load(dst, ddp_state(perturb(Small())), rules={**FREEZE, "freeze": {**FREEZE["freeze"], "batchnorm": "eval"}})
    clone = pickle.loads(pickle.dumps(dst))
    clone.train()
    assert not clone.bn.training
    assert not copy.deepcopy(dst).train().bn.training


# --------------------------------------------------------------------------- tied weights, buffers


def test_tied_parameter_loads_once_from_either_name():
    src = perturb(Tied(), seed=1)
    dst = Tied()
    report = remap.load(dst, {"embed.weight": src.embed.weight.detach().clone()})
    assert report.target_record("head.weight").status == "tied"
    assert report.target_record("head.weight").tied_to == "embed.weight"
    assert torch.equal(dst.head.weight, src.embed.weight) and dst.head.weight is dst.embed.weight
    assert report.totals.target_keys == 1


def test_tied_parameter_fed_twice_equal_is_checked_and_loaded_once():
    src = perturb(Tied(), seed=1)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    report = remap.load(Tied(), state)
    assert report.source_record("head.weight").fate == "duplicate"
    assert report.ok


def test_tied_parameter_fed_twice_differently_fails_untouched():
    dst = Tied()
    before = snapshot(dst)
    state = {"embed.weight": torch.randn(7, 4), "head.weight": torch.randn(7, 4)}
    with pytest.raises(CheckError) as info:
        remap.load(dst, state)
    assert info.value.report.failures[0].kind == "tied_conflict"
    assert snapshot(dst) == before


def test_non_persistent_buffers_are_not_target_keys():
    model = Small()
    model.register_buffer("scratch", torch.zeros(3), persistent=False)
    report = remap.load(model, {k: v.clone() for k, v in perturb(Small()).state_dict().items()})
    assert report.ok and "scratch" not in [t.key for t in report.targets]


def test_dtype_cast_is_reported_and_applied():
    src = {k: v.half() if v.is_floating_point() else v for k, v in perturb(Small()).state_dict().items()}
    dst = Small()
    report = remap.load(dst, src)
    assert "7 tensor(s) will be cast from float16 to float32 by load_state_dict" in report.warnings
    assert dst.conv.weight.dtype == torch.float32 and torch.equal(dst.conv.weight, src["conv.weight"].float())


class SneakyLinear(nn.Linear):
    """Drops its bias inside its own loading hook: torch then disagrees with the plan."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "bias", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def test_torch_disagreeing_with_the_plan_is_an_internal_error():
    model = Small()
    model.fc = SneakyLinear(4, 5)
    with pytest.raises(InternalError, match="torch and the plan disagree") as info:
        remap.load(model, {k: v.clone() for k, v in Small().state_dict().items()})
    assert info.value.exit_code == 4
    assert info.value.details["planned_missing"] == [] and info.value.details["torch_missing"] == ["fc.bias"]


def test_save_writes_loaded_state_atomically(tmp_path):
    from safetensors.torch import load_file

    dst = Tied()
    src = perturb(Tied(), seed=4)
    out = tmp_path / "out" / "model.safetensors"
    report = remap.load(dst, {"embed.weight": src.embed.weight.detach().clone()}, save=out, report=tmp_path / "r.json")
    saved = load_file(out)
    assert list(saved) == ["embed.weight"] and torch.equal(saved["embed.weight"], src.embed.weight)
    assert report.target["saved"] == {"path": str(out), "format": "safetensors"}
    assert (tmp_path / "r.json").read_text().startswith("{")
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.safetensors"]


def test_an_empty_load_passes_only_when_the_rules_say_so():
    dst = perturb(Small(), seed=2)
    before = snapshot(dst)
    rules = {"version": 1, "rules": [{"drop": "."}], "expect": {"missing": ".", "min_loaded": 0}}
    report = remap.load(dst, ddp_state(perturb(Small(), seed=1)), rules=rules)
    assert report.ok and report.totals.loaded == 0
    assert snapshot(dst) == before
