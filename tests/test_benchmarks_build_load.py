"""benchmarks/build_load.py and many_keys.py run end to end at tiny sizes (behaviour only, never timing).

``run(quick=True)`` writes each tiny model's checkpoints (plain and ``module.``-prefixed, safetensors
and ``.pth``) and runs every variant, peers and remap, in one process per model; then the small-keys
end to end. Every variant's own check must pass (each tensor equal to the checkpoint's, each buffer
equal to a normal build's); the last tests show that check failing on a wrong load.
"""

from __future__ import annotations

import importlib.util
import io
import sys
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("timm")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import build_load  # noqa: E402
import many_keys  # noqa: E402


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("build_load")
    lines: list[str] = []
    out = build_load.run(True, 1, str(tmp), progress=lines.append)
    out["progress"] = lines
    out["left_behind"] = [p.name for p in tmp.iterdir()]
    return out


def test_every_variant_of_every_model_loads_correctly(result: dict[str, Any]) -> None:
    has_mmengine = importlib.util.find_spec("mmengine") is not None
    for model in build_load.MODELS:
        m = result["models"][model]
        assert "status" not in m, (model, m["status"], result["progress"])
        assert list(m["variants"]) == [build_load.vid(v) for v in build_load.variants_of(model)]
        for ident, b in m["variants"].items():
            if ident.startswith("module./mmengine") and not has_mmengine:
                assert b["status"] == "not installed: pip install mmengine"
                continue
            assert b["status"] == "ok", (model, ident, b["status"])
            assert b["seconds"] > 0 and b["touch"] >= 0 and b["rss"] >= 0
            assert b["fastest_peer"].split("/")[0] == ident.split("/")[0]  # ratios against the same checkpoint
    assert build_load.failures(result) == []


def test_many_keys_loads_correctly(result: dict[str, Any]) -> None:
    mk = result["many_keys"]
    assert mk["keys"] == many_keys.KEYS["quick"]
    for name in many_keys.VARIANTS:
        assert mk["variants"][name]["status"] == "ok", (name, mk["variants"][name]["status"])
    assert set(many_keys.BASE) <= {v for v, b in mk["variants"].items() if "vs_hand_load" in b}


def test_tables_render_and_files_are_removed(result: dict[str, Any]) -> None:
    buf = io.StringIO()
    with redirect_stdout(buf):
        build_load.build_load_table(result)
    text = buf.getvalue()
    for needle in ("vit_tiny_patch16_224", "LlamaForCausalLM", "BertModel", "empty_weights + remap strip", "small keys"):
        assert needle in text
    assert result["left_behind"] == []


def test_the_check_catches_a_wrong_load(tmp_path: Path) -> None:
    """A tensor with another's values, a dtype changed, a buffer recomputed wrong: each is reported."""
    import torch
    import transformers

    info = build_load.save("llama", "quick", tmp_path)
    model = transformers.LlamaForCausalLM.from_pretrained(build_load.paths(tmp_path)["plain_dir"])
    assert build_load.check(model, tmp_path) == []
    with torch.no_grad():
        model.model.norm.weight.mul_(2)
    assert build_load.check(model, tmp_path) == ["differs: model.norm.weight"]
    model.model.norm.weight.data = model.model.norm.weight.data.float() / 2
    assert build_load.check(model, tmp_path) == ["differs: model.norm.weight"]
    model.model.norm.weight.data = model.model.norm.weight.data.to(torch.bfloat16)
    model.model.rotary_emb.inv_freq.add_(1)
    assert build_load.check(model, tmp_path) == ["buffer differs: model.rotary_emb.inv_freq"]
    assert info["dtype"] == "bfloat16" and info["tensors"] > 0


def test_many_keys_check_catches_a_wrong_load(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    many_keys.save(40, tmp_path)
    model = many_keys.build(40)
    sd = load_file(tmp_path / "model.safetensors")
    model.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()})
    assert many_keys.check(model, tmp_path) == []
    with torch.no_grad():
        model[0][3][1].bias.zero_()
    assert many_keys.check(model, tmp_path) == ["differs or missing: 0.3.1.bias"]
