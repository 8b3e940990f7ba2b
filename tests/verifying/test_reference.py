"""Recorded references (remap.verifying.reference): written and read back in their structure,
refused with a clear message when malformed, and the shipped Keras reference (outputs recorded
by Keras itself, tests/data/make_keras_reference.py) verifying the PyTorch port remap converts
from the .keras file; an ONNX model recorded with onnx's own reference evaluator likewise."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import remap
from data.make_keras_reference import INPUT_NHWC, KERAS_FILE, REFERENCE, KerasPort
from remap.errors import SourceError, UsageError
from remap.rules.verify_spec import VerifySpec
from remap.verifying.compare import tensor_leaves
from remap.verifying.reference import read_reference, verify_against_reference, write_reference

ROOT = Path(__file__).resolve().parents[2]
KERAS_CONFIG = ROOT / "configs" / "keras-to-torch.yaml"
ONNX_CONFIG = ROOT / "configs" / "onnx-to-module.yaml"
PORT = "data.make_keras_reference:KerasPort"  # tests/ is on sys.path while pytest runs


# ---------------------------------------------------------------------------- writing and reading


def test_round_trip_keeps_inputs_outputs_structure_and_settings(tmp_path: Path) -> None:
    ids = torch.randint(0, 9, (1, 4))
    outputs = {"logits": torch.randn(1, 4, 9), "hidden_states": (torch.randn(1, 4, 3), torch.randn(1, 4, 3)), "loss": None}
    path = tmp_path / "ref.safetensors"
    write_reference(path, inputs=([ids], {"attention_mask": torch.ones(1, 4)}), outputs=outputs, settings={"seed": 3, "framework": "torch"})

    ref = read_reference(path)
    assert torch.equal(ref.args[0], ids) and ref.args[0].dtype == torch.int64
    assert list(ref.kwargs) == ["attention_mask"] and ref.input_shapes() == {"0": [1, 4], "attention_mask": [1, 4]}
    assert list(ref.outputs) == ["logits", "hidden_states", "loss"] and ref.outputs["loss"] is None
    assert isinstance(ref.outputs["hidden_states"], tuple) and torch.equal(ref.outputs["hidden_states"][1], outputs["hidden_states"][1])
    assert ref.settings == {"seed": 3, "framework": "torch", "remap": remap.__version__}
    # the leaf paths compare() reports are the file's names: a verify.output selector finds the same tensors
    assert [name for name, _ in tensor_leaves(ref.outputs)] == [name for name, _ in tensor_leaves(outputs)] == ["logits", "hidden_states[0]", "hidden_states[1]"]
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["input.0", "input.attention_mask", "output.hidden_states[0]", "output.hidden_states[1]", "output.logits"]


def test_numpy_arrays_and_a_single_output(tmp_path: Path) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    write_reference(tmp_path / "r.safetensors", inputs=[x], outputs=x * 2, settings={})
    ref = read_reference(tmp_path / "r.safetensors")
    assert torch.equal(ref.outputs, torch.from_numpy(x * 2)) and torch.equal(ref.args[0], torch.from_numpy(x))


def test_a_file_written_by_safetensors_alone_is_read(tmp_path: Path) -> None:
    """No remap metadata: the one ``output`` tensor is the output; several make a dict by path."""
    save_file({"input.0": torch.ones(2), "output.a": torch.zeros(1), "output.b": torch.ones(1)}, str(tmp_path / "r.safetensors"))
    assert list(read_reference(tmp_path / "r.safetensors").outputs) == ["a", "b"]


def test_outputs_without_a_tensor_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as e:
        write_reference(tmp_path / "r.safetensors", inputs=[torch.ones(1)], outputs={"loss": None}, settings={})
    assert e.value.message == "write_reference: the outputs hold no tensor (found dict)"
    assert not (tmp_path / "r.safetensors").exists()


def _write(path: Path, tensors: dict, metadata: dict | None = None) -> str:
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


@pytest.mark.hostile
def test_not_a_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "ref.safetensors"
    path.write_bytes(b"PK\x03\x04 a zip, not a reference")
    with pytest.raises(SourceError) as e:
        read_reference(path)
    assert str(e.value) == (f"{path}: not a safetensors file (Error while deserializing header: header too large); a reference is a "
                            "safetensors file of inputs and outputs: write one with `remap verify RULES.yaml --record REF` or "
                            "remap.verifying.reference.write_reference (docs/verify.md)")  # fmt: skip
    assert e.value.exit_code == 3


def test_missing_reference(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as e:
        read_reference(tmp_path / "gone.safetensors")
    assert str(e.value) == (f"{tmp_path / 'gone.safetensors'}: no such file: the reference to verify against; write one with "
                            "`remap verify RULES.yaml --record REF` or remap.verifying.reference.write_reference (docs/verify.md)")


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"output": torch.ones(1)}, "no input tensors (input.0, input.NAME): the inputs the outputs came from; found output"),
        ({"input.0": torch.ones(1)}, "no output tensors (output, output.PATH): the outputs to compare with; found input.0"),
        ({"input.0": torch.ones(1), "output": torch.ones(1), "weights": torch.ones(1)},
         "holds the tensor 'weights', which is neither an input (input.0, input.NAME) nor an output (output, output.PATH)"),
        ({"input.0": torch.ones(1), "input.2": torch.ones(1), "output": torch.ones(1)},
         "positional inputs ['input.0', 'input.2'] skip input.1; they are numbered from input.0 without gaps"),
    ],
)  # fmt: skip
def test_tensors_that_are_not_a_reference(tmp_path: Path, tensors: dict, message: str) -> None:
    path = _write(tmp_path / "r.safetensors", tensors)
    with pytest.raises(SourceError) as e:
        read_reference(path)
    assert str(e.value) == f"{path}: {message}"


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"remap.structure": "{not json"},
         "metadata 'remap.structure' is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
        ({"remap.settings": "[1, 2]"}, "metadata 'remap.settings' is a JSON list, expected an object"),
        ({"remap.structure": json.dumps({"tensor": "output", "shape": [2, 5], "dtype": "float32"})},
         "the output tensor 'output' has shape [3], but metadata 'remap.structure' says [2, 5]"),
        ({"remap.structure": json.dumps({"dict": [["logits", {"tensor": "output.logits", "shape": [3]}]]})},
         "metadata 'remap.structure' names the output tensor 'output.logits', which the file does not hold (it holds output)"),
        ({"remap.structure": json.dumps({"tuple": []})},
         "the output tensor(s) output are not in the structure that metadata 'remap.structure' describes"),
        ({"remap.structure": json.dumps([1, 2])},
         "metadata 'remap.structure': expected {\"tensor\": NAME, \"shape\": [...], \"dtype\": ...}, {\"dict\": [[KEY, ...], ...]}, "
         "{\"tuple\": [...]}, {\"list\": [...]} or {\"none\": null}; found [1, 2]"),
        ({"remap.reference": "2"}, "reference layout version '2'; this remap reads version '1'"),
        ({"remap.structure": "[" * 100_000 + "]" * 100_000}, "metadata 'remap.structure' is nested deeper than JSON can be read here"),
        ({"remap.structure": '{"list": [' * 40 + '{"none": null}' + "]}" * 40},
         "metadata 'remap.structure' nests deeper than 32 levels; a model's outputs do not"),
    ],
)  # fmt: skip
def test_broken_metadata(tmp_path: Path, metadata: dict, message: str) -> None:
    path = _write(tmp_path / "r.safetensors", {"input.0": torch.ones(1), "output": torch.ones(3)}, metadata)
    with pytest.raises(SourceError) as e:
        read_reference(path)
    assert str(e.value) == f"{path}: {message}"


def test_verify_against_reference_selects_and_compares(tmp_path: Path) -> None:
    net = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    path = tmp_path / "r.safetensors"
    write_reference(path, inputs=[x], outputs={"logits": net(x), "extra": torch.zeros(1)}, settings={})
    spec = VerifySpec.parse({"input": [4, 3], "output": {"source": "logits", "target": None}})
    result = verify_against_reference(spec, net, path)
    assert (result["outcome"], result["max_abs"], result["reference"], result["input"]) == ("agree", 0.0, str(path), {"reference": {"0": [4, 3]}})
    with torch.no_grad():
        net.bias.add_(0.1)
    assert verify_against_reference(spec, net, path)["outcome"] == "differ"
    with pytest.raises(UsageError) as e:
        verify_against_reference(VerifySpec.parse({"input": [1], "output": "hidden"}), net, path)
    assert e.value.message == "verify.output: the recorded model's output has no 'hidden' (selector 'hidden'); it is a dict with keys logits, extra"


# ---------------------------------------------------------------------------- the shipped Keras reference


def _converted_port(tmp_path: Path) -> Path:
    """The .keras file converted into the PyTorch port by remap, saved as the user would."""
    saved = tmp_path / "port.safetensors"
    report = remap.load(KerasPort(), KERAS_FILE, rules=KERAS_CONFIG, save=saved)
    assert report.ok and report.totals.loaded == 14
    return saved


def test_shipped_files_are_small_and_recorded_by_keras() -> None:
    ref = read_reference(REFERENCE)
    assert KERAS_FILE.stat().st_size < 40_000 and REFERENCE.stat().st_size < 4_000
    assert ref.settings["framework"].startswith("keras 3") and ref.input_shapes() == {"0": [3, 3, 6, 5]}
    assert float(ref.outputs.abs().max()) > 0.1  # a real signal, not zeros


def test_keras_reference_verifies_the_converted_port(tmp_path: Path) -> None:
    saved = _converted_port(tmp_path)
    rules = {"version": 1, "target": {"model": PORT}}
    result = remap.verify(rules, reference=REFERENCE, target_weights=saved)
    assert result["outcome"] == "agree" and result["ok"] and result["max_abs"] < 1e-5 and result["reference"] == str(REFERENCE)


def test_a_wrong_port_differs(tmp_path: Path) -> None:
    """PyTorch's default BatchNorm epsilon (1e-5, Keras's is 1e-3): the weights load, the outputs do not agree."""
    saved = _converted_port(tmp_path)
    wrong = {"version": 1, "target": {"model": PORT, "kwargs": {"eps": 1e-5}}}
    result = remap.verify(wrong, reference=REFERENCE, target_weights=saved)
    assert result["outcome"] == "differ" and not result["ok"] and result["max_abs"] > 1e-4


def test_a_perturbed_weight_differs(tmp_path: Path) -> None:
    port = KerasPort()
    remap.load(port, KERAS_FILE, rules=KERAS_CONFIG)
    with torch.no_grad():
        port.conv2.weight[0, 0, 0, 0] += 0.05
    assert remap.verify(reference=REFERENCE, target=port)["outcome"] == "differ"


def test_rules_file_names_the_reference(tmp_path: Path) -> None:
    """`verify: {reference: REF}` relative to the rules file, the target from output.save."""
    saved = _converted_port(tmp_path)
    shutil.copy(REFERENCE, tmp_path / "ref.safetensors")
    (tmp_path / "rules.yaml").write_text(f"version: 1\ntarget: {{model: '{PORT}'}}\noutput: {{save: {saved.name}}}\n"
                                         "verify: {reference: ref.safetensors}\n")  # fmt: skip
    result = remap.verify(tmp_path / "rules.yaml")
    assert (result["outcome"], result["reference"]) == ("agree", str(tmp_path / "ref.safetensors"))


def test_shipped_reference_matches_keras_today(tmp_path: Path) -> None:
    """Keras, run now on the recorded input, gives the recorded output: the pair is what the script says."""
    os.environ["KERAS_BACKEND"] = "torch"
    pytest.importorskip("h5py")
    keras = pytest.importorskip("keras")
    ref = read_reference(REFERENCE)
    model = keras.models.load_model(KERAS_FILE)
    x = ref.args[0].numpy().transpose(0, 2, 3, 1)
    assert x.shape == INPUT_NHWC
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x, training=False)), ref.outputs.numpy(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- ONNX, recorded by onnx's reference evaluator


def _onnx_model(path: Path) -> None:
    """x -> Gemm(0.weight, 0.bias, transB) -> Relu -> Gemm(2.weight, 2.bias, transB): an nn.Sequential as exported."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = {"0.weight": rng.normal(size=(6, 4)), "0.bias": rng.normal(size=6), "2.weight": rng.normal(size=(3, 6)), "2.bias": rng.normal(size=3)}
    nodes = [helper.make_node("Gemm", ["x", "0.weight", "0.bias"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "2.weight", "2.bias"], ["y"], transB=1)]  # fmt: skip
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_onnx_reference_evaluator_recipe(tmp_path: Path) -> None:
    """docs/verify.md's ONNX recipe, as written there, then the port converted from the .onnx verified against it."""
    _onnx_model(tmp_path / "model.onnx")
    from onnx.reference import ReferenceEvaluator

    from remap.verifying.reference import write_reference as record

    x = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
    (y,) = ReferenceEvaluator(str(tmp_path / "model.onnx")).run(None, {"x": x})
    record(tmp_path / "ref.safetensors", inputs=[x], outputs=y, settings={"framework": "onnx.reference", "model": "model.onnx"})

    port = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    assert remap.load(port, tmp_path / "model.onnx", rules=ONNX_CONFIG).ok
    assert remap.verify(reference=tmp_path / "ref.safetensors", target=port)["outcome"] == "agree"
    swapped = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Sigmoid(), torch.nn.Linear(6, 3))  # the wrong activation
    swapped.load_state_dict(port.state_dict())
    assert remap.verify(reference=tmp_path / "ref.safetensors", target=swapped)["outcome"] == "differ"


def test_jax_arrays_are_written_as_they_are(tmp_path: Path) -> None:
    """docs/verify.md's JAX recipe hands write_reference JAX arrays (or np.asarray of them)."""
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
    write_reference(tmp_path / "r.safetensors", inputs=[x], outputs={"logits": x * 2}, settings={"framework": "jax"})
    ref = read_reference(tmp_path / "r.safetensors")
    assert torch.equal(ref.outputs["logits"], torch.arange(6.0).reshape(2, 3) * 2)


def test_api_messages_name_the_python_arguments() -> None:
    with pytest.raises(UsageError) as e:
        remap.verify({"version": 1}, target=torch.nn.Linear(1, 1))
    assert e.value.message == ("nothing to verify against: the rules have no `verify` section (e.g. `verify: {input: [1, 3, 224, 224]}`) "
                               "and no recorded reference was given with --reference REF, or pass the reference argument to remap.verify")
    with pytest.raises(UsageError) as e:
        remap.verify({"version": 1, "target": {"model": PORT}}, reference=REFERENCE)
    assert e.value.message == ("verify needs the converted weights: set output.save in the rules (what `remap apply RULES.yaml` "
                               "writes) or give --target-weights FILE, or pass the target_weights argument to remap.verify")
