"""remap diff on an ONNX file whose initializers have graph-internal names (issue 14, item 4).

The TorchScript exporter's default constant folding folds each BatchNorm into the
convolution before it and names the folded tensors after the graph (``onnx::Conv_52``);
a Linear applied to a 3-d input becomes a ``MatMul`` whose weight is stored (in, out) as
``onnx::MatMul_60``. Names say nothing there; the role each initializer plays in its node
(Conv input 1 is a weight, MatMul input 1 a transposed weight) and the order the graph reads
them, against the order the target's forward pass calls its modules, do. The module below
defines its layers in another order than it calls them, so that definition order, which is
never evidence, would pair them wrongly.

Before this evidence, ``remap diff`` left the two [8, 8, 3, 3] convolutions and the three
[8] biases ambiguous and paired ``onnx::MatMul_60`` with ``proj.weight`` as stored "by shape
alone", without the transpose its MatMul role needs (see
:func:`test_without_graph_evidence_shapes_alone_mislead`).

Factories (``tests.diffing.test_onnx_order:...``) are importable by name: tests/ is on ``sys.path``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from remap.sources.readers import open_source
from remap.diffing.alignment import align, diff
from remap.diffing.draft import draft_rules
from test_conversions import pretrained_like
from tests.diffing.test_diff import apply_cli, diff_write, run

onnx = pytest.importorskip("onnx")

IMAGE = (1, 3, 8, 8)


class Net(nn.Module):
    """conv-bn-relu three times (the last two convolutions the same shape), a Linear over
    the pixels as tokens (a MatMul in ONNX), a Linear head (a Gemm). ``conv3`` and ``bn3`` are
    defined before ``conv2`` and ``bn2`` but run after them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.proj = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        tokens = x.flatten(2).transpose(1, 2)  # (N, H*W, C): the Linear becomes a MatMul
        return self.fc(torch.relu(self.proj(tokens)).mean(1))


FUSED = [["conv1", "bn1"], ["conv2", "bn2"], ["conv3", "bn3"]]


def fused_net() -> nn.Module:
    """The module as the folded export computes it: each BatchNorm fused into its conv."""
    return torch.ao.quantization.fuse_modules(Net().eval(), FUSED)


class DataDependent(Net):
    """Net with a branch on a tensor's value: it cannot run on the meta device."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > 0):
            x = x * 2
        return super().forward(x)


def fused_data_dependent() -> nn.Module:
    return torch.ao.quantization.fuse_modules(DataDependent().eval(), FUSED)


def export(model: nn.Module, path: Path) -> Path:
    """torch.onnx.export with its defaults (constant folding on), the TorchScript exporter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(IMAGE),), str(path), dynamo=False)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[nn.Module, Path]:
    model = pretrained_like(Net())
    path = export(model, tmp_path_factory.mktemp("onnx") / "net.onnx")
    names = {t.name for t in onnx.load(str(path)).graph.initializer}
    assert {n for n in names if n.startswith("onnx::Conv_")} and {n for n in names if n.startswith("onnx::MatMul_")}
    assert not any(n.startswith(("conv", "bn")) for n in names)  # folded: names say nothing
    return model, path


def image(seed: int = 1) -> torch.Tensor:
    return torch.randn(4, *IMAGE[1:], generator=torch.Generator().manual_seed(seed))


def graph_names(path: Path) -> dict[str, tuple[str, int]]:
    """initializer -> (name of the node that reads it, input index), read with onnx itself."""
    out = {}
    for node in onnx.load(str(path)).graph.node:
        for slot, name in enumerate(node.input):
            out.setdefault(name, (node.name, slot))
    return out


def test_diff_write_apply_reproduces_the_module(capsys, tmp_path, exported):
    model, path = exported
    rules, text, data = diff_write(capsys, tmp_path, path, "tests.diffing.test_onnx_order:fused_net")
    renames = data["rules"][0]["rename"]
    readers = graph_names(path)
    # each rename goes to the module whose node reads it (the exporter names nodes after modules)
    for pattern, target in renames.items():
        key = pattern.strip("^$").replace("\\", "")
        node, slot = readers[key]
        module, leaf = target.rsplit(".", 1)
        assert node == f"/{module}/{'MatMul' if module == 'proj' else 'Conv'}", (key, node, target)
        assert leaf == {1: "weight", 2: "bias"}[slot], (key, slot, target)
    assert set(renames.values()) == {f"conv{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")} | {"proj.weight"}
    assert data["rules"][1] == {"transpose": "^proj\\.weight$"}  # MatMul stores it (in, out): square, only the role says so
    assert "by role and shape in the ONNX graph" in text and "graph's order against the forward pass" in text
    assert "AMBIGUOUS" not in text and "UNDECLARED" not in text

    report, saved = apply_cli(capsys, tmp_path, rules)
    assert report["ok"] and report["totals"]["loaded"] == 10
    loaded = fused_net()
    loaded.load_state_dict(saved)
    with torch.no_grad():
        expected, got = model.eval()(image()), loaded.eval()(image())
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # a fresh module differs: the load did something
        assert not torch.allclose(fused_net()(image()), expected, atol=1e-3)


def test_pairs_follow_the_forward_pass_not_the_definition_order(exported):
    _, path = exported
    a = diff(path, "tests.diffing.test_onnx_order:fused_net")
    by_target = {p.target: p for p in a.pairs}
    readers = graph_names(path)
    assert readers[by_target["conv2.weight"].source][0] == "/conv2/Conv"  # conv2 runs second though defined third
    assert readers[by_target["conv3.weight"].source][0] == "/conv3/Conv"
    assert by_target["conv2.weight"].evidence == "graph" and by_target["conv2.weight"].detail.startswith("1st of 2 Conv weight")
    assert by_target["conv1.weight"].detail.startswith("the only Conv weight [8, 3, 3, 3] left in the graph")
    assert by_target["proj.weight"].conflict is not None and by_target["proj.weight"].conflict.fix == "transpose"
    assert not a.choices and not a.source_only and not a.target_only
    assert any("ran once on zero input (input.1 float32 [1, 3, 8, 8])" in n for n in a.target_description["notes"])
    assert a.to_dict()["totals"]["by_evidence"] == {"exact": 3, "graph": 7}


def test_without_graph_evidence_shapes_alone_mislead(exported):
    """What diff did before (names and shapes only): two choices, and the MatMul weight
    paired as stored by shape alone, without the transpose it needs."""
    _, path = exported
    with open_source(path) as src:
        meta = dict(src.meta)
    a = align(meta, fused_net())
    square = next(p for p in a.pairs if p.target == "proj.weight")
    assert square.evidence == "shape" and square.conflict is None
    assert sorted(len(c.sources) for c in a.choices) == [2, 3]


def test_a_checkpoint_target_leaves_same_shaped_layers_a_choice(capsys, tmp_path, exported):
    """Without a module there is no forward pass: role and shape pair what is unique, the
    rest stays a choice, and the draft leaves it undeclared so that apply fails."""
    _, path = exported
    target = tmp_path / "target.pt"
    torch.save(fused_net().state_dict(), target)
    a = diff(path, target)
    by_target = {p.target: p for p in a.pairs}
    assert by_target["conv1.weight"].evidence == "graph" and by_target["proj.weight"].conflict.fix == "transpose"
    shapes = sorted((c.shape, len(c.sources)) for c in a.choices)
    assert shapes == [((8,), 3), ((8, 8, 3, 3), 2)]
    text = draft_rules(a).text
    assert "AMBIGUOUS" in text and "UNDECLARED" in text


def test_a_target_that_cannot_run_on_meta_leaves_a_choice_and_says_why(exported):
    _, path = exported
    a = diff(path, "tests.diffing.test_onnx_order:fused_data_dependent")
    notes = " ".join(a.target_description.get("notes", ()))
    assert "could not be run on the ONNX graph's input shapes" in notes and "graph order is not used" in notes
    assert sorted((c.shape, len(c.sources)) for c in a.choices) == [((8,), 3), ((8, 8, 3, 3), 2)]


def test_batchnorm_folded_away_is_held_undeclared(capsys, tmp_path, exported):
    """Into the unfused module, the convolutions pair (with the folded weights) and the
    BatchNorm keys the file does not hold are left undeclared with a note saying why."""
    _, path = exported
    rules, text, data = diff_write(capsys, tmp_path, path, "tests.diffing.test_onnx_order:Net")
    a = diff(path, "tests.diffing.test_onnx_order:Net")
    assert set(a.held) == {f"bn{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert any("no BatchNormalization node" in n for n in a.notes)
    assert "folded away" in text and "expect" not in data
    code, out, err = run(capsys, "apply", rules, "-q")
    assert code == 1 and "missing" in err


def test_a_key_whose_role_is_unknown_blocks_its_shape(tmp_path):
    """An initializer read by an op remap gives no role (Mul) could be any key of its
    shape: the Conv biases of that shape are not paired by role, and stay a choice."""
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    def init(name, shape):
        return numpy_helper.from_array(np.zeros(shape, np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["y1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["y1", "scale"], ["y2"], name="m"),
             helper.make_node("Gemm", ["f", "gw", "gb"], ["z"], name="g", transB=0)]  # fmt: skip
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4]), helper.make_tensor_value_info("f", TensorProto.FLOAT, [1, 6])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 5])],
        [init("w1", (4, 2, 3, 3)), init("b1", (4,)), init("scale", (4,)), init("gw", (6, 5)), init("gb", (5,))],
    )  # fmt: skip
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph), str(path))
    target = {"conv.weight": [4, 2, 3, 3], "conv.bias": [4], "norm.weight": [4], "fc.weight": [5, 6], "fc.bias": [5]}
    a = diff(path, target)
    by_target = {p.target: (p.source, p.evidence) for p in a.pairs}
    assert by_target["conv.weight"] == ("w1", "graph")
    assert by_target["fc.weight"] == ("gw", "graph")  # Gemm with transB=0 stores (in, out): reversed shapes, so a transpose
    assert next(p for p in a.pairs if p.target == "fc.weight").conflict.fix == "transpose"
    assert [(c.sources, c.targets) for c in a.choices] == [(("b1", "scale"), ("conv.bias", "norm.weight"))]


@pytest.mark.hostile
def test_a_graph_that_changed_after_it_was_opened_gives_no_roles_and_says_so(tmp_path, exported):
    """The second, bounded scan (inputs, Gemm attributes) of a file truncated since the reader
    opened it: no roles, no order, a note; never a traceback."""
    from remap.diffing.graph_evidence import graph_evidence
    from remap.sources.onnx_reader import OnnxReader

    _, path = exported
    copy = tmp_path / "net.onnx"
    copy.write_bytes(path.read_bytes())
    reader = OnnxReader(copy)
    copy.write_bytes(path.read_bytes()[:200])
    g = graph_evidence(reader)
    assert all(r is None for r in g.roles.values()) and not g.inputs
    assert "could not be read again" in g.notes[0]
    a = align(reader.meta, fused_net(), graph=g)
    assert all(p.evidence != "graph" for p in a.pairs) and a.notes[0] == g.notes[0]
