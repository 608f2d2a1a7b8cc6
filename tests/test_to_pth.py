"""HF -> one .pth state dict (`--to pth`): named so that `ckptflow resolve` finds it, fp16 by
default, and loading strictly into the model its config describes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptflow.cli import main


@pytest.fixture(scope="module")
def tied_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniMind ties its head to the embeddings: save_pretrained leaves lm_head out."""
    from tests.fixtures.tiny import build_tiny_qwen2

    path = tmp_path_factory.mktemp("tied-hf")
    build_tiny_qwen2(seed=5, tie_word_embeddings=True).save_pretrained(path)
    return path


def test_pth_is_resolved_and_loads_strictly(
    tied_hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path / "out"
    assert main(["convert", str(tied_hf_dir), str(out), "--to", "pth", "--stage", "full_sft"]) == 0
    capsys.readouterr()
    assert (
        main(["resolve", "--stage", "full_sft", "--hidden-size", "64", "--local-dir", str(out)])
        == 0
    )
    found = Path(capsys.readouterr().out.strip())
    assert found == out / "full_sft_64.pth"

    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["files"]["full_sft_64.pth"]
    data = found.read_bytes()
    assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["size"], entry["sha256"])
    assert (out / "_SUCCESS").exists() and manifest["options"]["dtype"] == "fp16"

    state = torch.load(found, weights_only=True)
    source = load_file(tied_hf_dir / "model.safetensors")
    assert "lm_head.weight" not in source and "lm_head.weight" in state
    assert {t.dtype for t in state.values()} == {torch.float16}
    # One copy of the tied tensor in the file, shared on load like model.state_dict() holds it.
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tied_hf_dir)).half()
    model.load_state_dict(state, strict=True)
    loaded = model.state_dict()
    for name, tensor in source.items():
        assert torch.equal(loaded[name], tensor.half()), name


def test_hidden_size_from_the_config_and_bf16_on_request(tiny_hf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--to", "pth", "--stage", "pretrain", "--hidden-size", "64", "--dtype", "bf16"]
    assert main(["convert", str(tiny_hf_dir), str(out), *args]) == 0
    state = torch.load(out / "pretrain_64.pth", weights_only=True)
    source = load_file(tiny_hf_dir / "model.safetensors")
    assert state.keys() == source.keys()
    for name, tensor in source.items():
        assert torch.equal(state[name], tensor.bfloat16()), name


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--to", "pth"], "--to pth needs --stage"),
        (["--to", "pth", "--stage", "pretrain", "--hidden-size", "512"], "hidden_size=64"),
        (["--to", "pth", "--stage", "pretrain", "--moe"], "describes a dense model"),
        (["--to", "pth", "--stage", "../x"], "not a plain name"),
        (["--stage", "pretrain"], "--stage: for --to pth"),
        (["--to", "pth", "--stage", "pretrain", "--dcp-key", "model"], "--dcp-key is for --to dcp"),
    ],
)
def test_refusals_are_one_line_and_write_nothing(
    tiny_hf_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    says: str,
) -> None:
    assert main(["convert", str(tiny_hf_dir), str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert says in err and err.startswith("ckptflow: error:")
    assert not (tmp_path / "out").exists()
