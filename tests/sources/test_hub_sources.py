"""Hugging Face repos read from the local hub cache: hf://org/name[@revision] and a bare org/name.

Every cache here is a temporary folder filled in the hub's own layout (refs/<branch> holding
a commit hash, snapshots/<hash>/<file> symlinked to blobs/<sha256>), with weights written by
the real libraries (timm's tiny ``test_resnet``, transformers' ``save_pretrained``). Nothing
is downloaded.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same
from safetensors.torch import load_file, save_file

import remap
from remap.cli import main
from remap.errors import SourceError
from remap.sources.hub import hf_cache_dir, parse_hub_ref
from remap.sources.readers import open_source

REPO = "timm/test_resnet.r160_in1k"  # a real timm repo on the hub: its weights are timm's test_resnet
MAIN = "1" * 40
DEV = "2" * 40


def _timm_state(seed: int) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}


def fill_cache(cache: Path, repo: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ()) -> Path:
    """Put ``files`` in ``cache`` as the hub does for ``repo`` at ``commit``; point ``refs`` at it."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / commit
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(os.path.relpath(blob, (snapshot / name).parent))
    for ref in refs:
        (folder / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return snapshot


def _safetensors_bytes(state: dict[str, torch.Tensor], tmp_path: Path) -> bytes:
    path = tmp_path / "staging.safetensors"
    save_file(state, str(path))
    return path.read_bytes()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "hub-cache"
    folder.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.chdir(tmp_path)
    return folder


@pytest.fixture
def timm_repo(cache: Path, tmp_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """timm/test_resnet.r160_in1k at two commits: main (seed 0) and dev (seed 1)."""
    states = {MAIN: _timm_state(0), DEV: _timm_state(1)}
    for commit, refs in ((MAIN, ("main",)), (DEV, ("dev",))):
        files = {"model.safetensors": _safetensors_bytes(states[commit], tmp_path), "config.json": b"{}"}
        fill_cache(cache, REPO, commit, files, refs)
    return states


def _read_all(source: str) -> tuple[dict[str, torch.Tensor], dict]:
    with open_source(source) as src:
        return {k: src.read(k).clone() for k in src.meta}, src.description


def _assert_state(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for k in expected:
        assert_same(got[k], expected[k])


@pytest.mark.parametrize(
    ("source", "commit"),
    [
        (f"hf://{REPO}", MAIN),
        (f"hf://{REPO}@main", MAIN),
        (f"hf://{REPO}@dev", DEV),  # a branch, through refs/dev
        (f"hf://{REPO}@{DEV}", DEV),  # a commit hash, straight to its snapshot
        (f"hf-hub:{REPO}", MAIN),  # timm's own spelling
        (REPO, MAIN),  # bare org/name: no such local path, so the cache
        (f"{REPO}@dev", DEV),
    ],
)
def test_a_repo_in_the_cache_opens_at_the_revision_named(timm_repo, cache, source: str, commit: str) -> None:
    got, description = _read_all(source)
    _assert_state(got, timm_repo[commit])
    snapshot = cache / "models--timm--test_resnet.r160_in1k" / "snapshots" / commit
    assert (description["path"], description["folder"], description["format"]) == (
        str(snapshot / "model.safetensors"), str(snapshot), "safetensors"
    )
    revision = parse_hub_ref(f"hf://{source.removeprefix('hf://').removeprefix('hf-hub:')}").revision
    assert description["notes"][-1] == (
        f"Hugging Face repo {REPO} at {revision} (snapshot {commit}) from the local cache {cache}"
    )


def test_an_existing_local_path_wins_over_the_cache(timm_repo, tmp_path: Path) -> None:
    local = tmp_path / REPO
    local.mkdir(parents=True)
    save_file(timm_repo[DEV], str(local / "model.safetensors"))
    got, description = _read_all(REPO)
    _assert_state(got, timm_repo[DEV])
    assert description["path"] == str(Path(REPO) / "model.safetensors") and description["notes"] == []
    got, _ = _read_all(f"hf://{REPO}")  # hf:// is always the cache
    _assert_state(got, timm_repo[MAIN])


def test_a_sharded_save_pretrained_checkpoint_and_a_pytorch_model_bin(cache: Path, tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    saved = tmp_path / "saved"
    model.save_pretrained(saved, max_shard_size="20KB")
    files = {p.name: p.read_bytes() for p in saved.iterdir()}
    assert "model.safetensors.index.json" in files  # sharded by the library itself
    fill_cache(cache, "org/tiny-gpt2", MAIN, files, ("main",))
    got, description = _read_all("hf://org/tiny-gpt2")
    assert description["format"] == "safetensors-index" and description["files"] > 1
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: saved once
    _assert_state({k: got[k] for k in expected}, expected)

    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    fill_cache(cache, "org/bin-only", MAIN, {"pytorch_model.bin": (tmp_path / "pytorch_model.bin").read_bytes()}, ("main",))
    got, description = _read_all("hf://org/bin-only")
    assert description["format"] == "torch-zip"
    _assert_state(got, dict(model.state_dict()))


def test_a_repo_missing_from_the_cache(cache: Path) -> None:
    with pytest.raises(SourceError) as info:
        open_source("hf://org/missing")
    assert (str(info.value), info.value.exit_code) == (
        f"hf://org/missing: no Hugging Face repo 'org/missing' in the local cache {cache} (no folder "
        "models--org--missing there); remap reads only files already downloaded: fetch them first "
        "(`hf download org/missing`), or point HF_HUB_CACHE (or HF_HOME) at the cache that holds them",
        3,
    )


def test_a_bare_name_that_is_neither_a_path_nor_in_the_cache(cache: Path) -> None:
    with pytest.raises(SourceError) as info:
        open_source("org/missing@v2")
    assert (str(info.value), info.value.exit_code) == (
        f"org/missing@v2: no such file or folder org/missing@v2, and no Hugging Face repo 'org/missing' in the "
        f"local cache {cache} (no folder models--org--missing there); remap reads only files already downloaded: "
        "fetch them first (`hf download org/missing --revision v2`), or point HF_HUB_CACHE (or HF_HOME) at the "
        "cache that holds them",
        3,
    )


def test_a_path_with_a_weights_suffix_is_only_a_path(cache: Path) -> None:
    with pytest.raises(SourceError) as info:
        open_source("ckpt/model.pth")
    assert str(info.value).startswith("ckpt/model.pth: no such file or folder; expected a torch.save file")


@pytest.mark.parametrize(
    ("revision", "kind"), [("dev2", "revision"), ("3" * 40, "commit")]
)
def test_a_revision_missing_from_the_cache(timm_repo, cache: Path, revision: str, kind: str) -> None:
    with pytest.raises(SourceError) as info:
        open_source(f"hf://{REPO}@{revision}")
    assert str(info.value) == (
        f"hf://{REPO}@{revision}: Hugging Face repo {REPO!r} is in the local cache {cache}, but not at {kind} "
        f"{revision!r} (refs: dev -> {DEV[:12]}, main -> {MAIN[:12]}; snapshots: {MAIN}, {DEV}); fetch it first "
        f"(`hf download {REPO} --revision {revision}`), or name a cached revision with @"
    )


def test_a_malformed_hub_name() -> None:
    with pytest.raises(SourceError) as info:
        open_source("hf://resnet18")
    assert (str(info.value), info.value.exit_code) == (
        "source: expected hf://org/name or hf://org/name@revision (a Hugging Face model repo, e.g. "
        "hf://timm/resnet18.a1_in1k), found 'hf://resnet18'",
        3,
    )


def test_without_huggingface_hub_the_error_names_the_extra(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` raises ImportError
    with pytest.raises(SourceError) as info:
        open_source("hf://org/name")
    assert (str(info.value), info.value.exit_code) == (
        "hf://org/name: huggingface_hub is not installed, and remap needs it to find Hugging Face repo "
        "'org/name' in the local cache: pip install 'remap[hub]'",
        3,
    )


@pytest.mark.parametrize(
    "env",
    [
        {"HF_HUB_CACHE": "/x/hub-cache", "HF_HOME": "/x/home"},
        {"HF_HOME": "/x/home", "XDG_CACHE_HOME": "/x/xdg"},
        {"XDG_CACHE_HOME": "/x/xdg"},
        {},
    ],
)
def test_the_cache_folder_is_the_one_huggingface_hub_uses(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    names = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = "from huggingface_hub import constants; print(constants.HF_HUB_CACHE)"
    reference = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert str(hf_cache_dir()) == reference


def test_remap_load_and_the_cli_read_a_repo_from_the_cache(timm_repo, cache: Path, tmp_path: Path, capsys) -> None:
    import timm

    model = timm.create_model("test_resnet")
    report = remap.load(model, f"hf://{REPO}@dev", rules={"version": 1})
    assert report.ok
    _assert_state({k: v for k, v in model.state_dict().items()}, timm_repo[DEV])

    snapshot = cache / "models--timm--test_resnet.r160_in1k" / "snapshots" / MAIN
    assert main(["inspect", f"hf://{REPO}"]) == 0
    out = capsys.readouterr().out
    assert str(snapshot / "model.safetensors") in out and "conv1.weight" in out.replace("{", "").replace("}", "")

    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\ntarget: {model: 'timm:create_model', args: [test_resnet]}\n")
    assert main(["apply", str(rules), "--source", f"hf://{REPO}", "--save", str(tmp_path / "out.safetensors")]) == 0
    capsys.readouterr()
    _assert_state(load_file(str(tmp_path / "out.safetensors")), timm_repo[MAIN])
