"""`ckptflow split` on a tiny Qwen2.5-VL saved by transformers: names, tensors, metadata, errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpt_core.errors import KeyMismatchError, PublishError
from ckpt_core.vlm.split import split
from tests.fixtures.tiny_vlm import save_tiny_vlm


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vlm-base")
    save_tiny_vlm(path)
    return path


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _expected_parts(weights: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """The split's names, written out by hand from whichever layout the file uses."""
    vision, text = {}, {}
    for name, tensor in weights.items():
        if name == "lm_head.weight":
            text[name] = tensor
        elif name.startswith(("model.visual.", "visual.")):
            vision[name.split("visual.", 1)[1]] = tensor
        elif name.startswith("model.language_model."):
            text[name.removeprefix("model.language_model.")] = tensor
        else:
            text[name.removeprefix("model.")] = tensor
    return vision, text


def _assert_parts_equal(out: Path, weights: dict[str, torch.Tensor]) -> None:
    vision, text = _expected_parts(weights)
    got_v, got_t = _load(out / "vision_model.pt"), _load(out / "text_model.pt")
    assert set(got_v["model"]) == set(vision) and set(got_t["model"]) == set(text)
    for name, tensor in vision.items():
        assert torch.equal(got_v["model"][name], tensor), name
    for name, tensor in text.items():
        assert torch.equal(got_t["model"][name], tensor), name
    assert got_v["config"]["hidden_size"] == 32 and got_t["config"]["hidden_size"] == 64


def test_split_untied_keeps_lm_head_and_writes_metadata(base: Path, tmp_path: Path) -> None:
    result = split(str(base), str(tmp_path / "split"))
    out = tmp_path / "split"
    weights = load_file(base / "model.safetensors")
    _assert_parts_equal(out, weights)
    text = _load(out / "text_model.pt")["model"]
    assert "lm_head.weight" in text and "embed_tokens.weight" in text
    assert "blocks.0.attn.qkv.weight" in _load(out / "vision_model.pt")["model"]
    assert "layers.0.self_attn.q_proj.weight" in text
    assert result.counts == {"vision": 30, "text": 27}

    meta = json.loads((out / "split_metadata.json").read_text())
    import transformers

    assert meta["transformers_version"] == transformers.__version__
    assert meta["layout_read"] == result.layout
    assert meta["parts"]["vision"]["tensors"] == 30 and meta["parts"]["text"]["tensors"] == 27
    for name, info in meta["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == info["sha256"], name
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (base / "config.json").read_text()
    )
    # Same source again: found complete, skipped.
    assert split(str(base), str(out)).skipped


@pytest.mark.parametrize("layout", ["legacy", "nested"])
def test_split_reads_both_key_layouts(base: Path, tmp_path: Path, layout: str) -> None:
    """The file saved by this transformers, rewritten in the other layout, splits the same."""
    weights = load_file(base / "model.safetensors")
    src = tmp_path / layout
    src.mkdir()
    (src / "config.json").write_text((base / "config.json").read_text())
    renamed = {}
    for name, tensor in weights.items():
        vision, text = name.startswith(("visual.", "model.visual.")), name != "lm_head.weight"
        local = name.split("visual.", 1)[1] if vision else name.split(".", 1)[1]
        local = local.removeprefix("language_model.")
        if not text:
            renamed[name] = tensor
        elif layout == "legacy":
            renamed[("visual." if vision else "model.") + local] = tensor
        else:
            renamed[("model.visual." if vision else "model.language_model.") + local] = tensor
    save_file(renamed, src / "model.safetensors", metadata={"format": "pt"})
    result = split(str(src), str(tmp_path / "out"))
    assert result.layout == layout
    _assert_parts_equal(tmp_path / "out", weights)


def test_split_tied_has_no_lm_head(tmp_path: Path) -> None:
    save_tiny_vlm(tmp_path / "tied", tie_word_embeddings=True)
    result = split(str(tmp_path / "tied"), str(tmp_path / "out"))
    assert result.counts == {"vision": 30, "text": 26}
    assert "lm_head.weight" not in _load(tmp_path / "out" / "text_model.pt")["model"]


def _copy_without(base: Path, dst: Path, drop: str = "", add: str = "") -> Path:
    weights = load_file(base / "model.safetensors")
    weights.pop(drop, None)
    if add:
        weights[add] = torch.zeros(3)
    dst.mkdir()
    (dst / "config.json").write_text((base / "config.json").read_text())
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_untied_model_without_lm_head_is_refused(base: Path, tmp_path: Path) -> None:
    src = _copy_without(base, tmp_path / "nohead", drop="lm_head.weight")
    with pytest.raises(KeyMismatchError, match="lm_head"):
        split(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "split_metadata.json").exists()


def test_tensor_without_a_role_is_refused_by_name(base: Path, tmp_path: Path) -> None:
    src = _copy_without(base, tmp_path / "extra", add="visual.blocks.0.attn.rope_scale")
    with pytest.raises(KeyMismatchError, match=r"blocks\.0\.attn\.rope_scale"):
        split(str(src), str(tmp_path / "out"))


def test_other_source_into_existing_split_is_refused(base: Path, tmp_path: Path) -> None:
    split(str(base), str(tmp_path / "out"))
    save_tiny_vlm(tmp_path / "other", seed=5)
    with pytest.raises(PublishError, match="--overwrite"):
        split(str(tmp_path / "other"), str(tmp_path / "out"))
    assert not split(str(tmp_path / "other"), str(tmp_path / "out"), overwrite=True).skipped
