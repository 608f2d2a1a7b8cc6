"""HF -> HF conversion through ckpt_core.pipeline.convert, checked with transformers itself."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import pytest
import torch
from safetensors import safe_open
from transformers import Qwen2ForCausalLM

from ckpt_core.errors import KeyMismatchError, PublishError, SourceChangedError, VerifyError
from ckpt_core.pipeline import convert as core
from ckpt_core.pipeline.convert import ConvertOptions, convert
from tests.fixtures.tiny import build_tiny_qwen2, sample_input_ids


def _load(path: Path, dtype: torch.dtype = torch.float32) -> Qwen2ForCausalLM:
    model, info = Qwen2ForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model


def _tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("chunk_bytes", [None, 1000])
def test_fp32_sharded_loads_strictly_with_identical_logits(
    tiny_model: Qwen2ForCausalLM,
    tiny_hf_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    chunk_bytes: int | None,
) -> None:
    if chunk_bytes:
        monkeypatch.setattr("ckpt_core.pipeline.stream.CHUNK_BYTES", chunk_bytes)
    before = _tree_digest(tiny_hf_dir)
    out = tmp_path / "out"
    result = convert(
        str(tiny_hf_dir), str(out), ConvertOptions(dtype="fp32", max_shard_bytes=150_000)
    )
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tiny_model.state_dict())
    assert index["metadata"]["total_size"] == sum(
        t.nbytes for t in tiny_model.state_dict().values()
    )
    assert result.report is not None and result.report.ok
    assert result.report.tensors == len(tiny_model.state_dict())
    loaded = _load(out)
    ids = sample_input_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, tiny_model(ids).logits)
    assert _tree_digest(tiny_hf_dir) == before  # the source is never written
    assert (out / "_SUCCESS").exists()
    assert not list(tmp_path.glob(".*staging*"))


def test_default_is_bf16_for_floats_and_keeps_integers(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    tensors = {"w": torch.randn(4, 4), "h": torch.randn(3).half(), "ids": torch.arange(5)}
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    result = convert(str(src), str(tmp_path / "out"))
    assert result.report is not None and result.report.ok
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("w").dtype == torch.bfloat16
        assert f.get_tensor("h").dtype == torch.bfloat16
        assert torch.equal(f.get_tensor("ids"), tensors["ids"])
        assert torch.equal(f.get_tensor("w"), tensors["w"].bfloat16())


def test_without_a_config_none_is_invented_and_a_note_says_so(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _save_single(src, {"w": torch.randn(4, 4)})
    result = convert(str(src), str(tmp_path / "out"))
    assert result.report is not None
    # No config anywhere: weights, manifest and a warning, no invented config.
    assert not (tmp_path / "out" / "config.json").exists()
    assert any("no config.json" in note for note in result.report.notes)


def test_bin_source_with_tied_head_drops_it(tmp_path: Path) -> None:
    model = build_tiny_qwen2(seed=3, tie_word_embeddings=True)
    src = tmp_path / "src"
    src.mkdir()
    model.config.save_pretrained(src)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # stored twice
    torch.save(state, src / "pytorch_model.bin")
    out = tmp_path / "out"
    result = convert(str(src), str(out), ConvertOptions(dtype="keep"))
    assert result.report is not None and result.report.dropped == ("lm_head.weight",)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in list(f.keys())
    loaded = _load(out)
    ids = sample_input_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_untied_model_without_head_is_refused(tmp_path: Path) -> None:
    model = build_tiny_qwen2(seed=4, tie_word_embeddings=False)
    src = tmp_path / "src"
    src.mkdir()
    model.config.save_pretrained(src)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(KeyMismatchError, match="lm_head.weight"):
        convert(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_assets_from_base_and_no_stale_weights(
    tiny_model: Qwen2ForCausalLM, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    src, base = tmp_path / "train-out", tmp_path / "base"
    src.mkdir()
    save_file(
        dict(tiny_model.state_dict()), str(src / "model.safetensors"), metadata={"format": "pt"}
    )
    tiny_model.save_pretrained(base, max_shard_size="100KB")  # base has its own index and shards
    (base / "pytorch_model.bin").write_bytes(b"stale")
    (base / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    out = tmp_path / "out"
    convert(str(src), str(out), ConvertOptions(dtype="fp32", base=str(base)))
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer_config.json"} <= names
    assert "pytorch_model.bin" not in names and "model.safetensors.index.json" not in names
    assert names & {p.name for p in base.glob("model-*")} == set()
    _load(out)


def test_rerun_is_a_noop(tiny_hf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(str(tiny_hf_dir), str(out), ConvertOptions(dtype="fp32"))
    stamp = (out / "manifest.json").stat().st_mtime_ns
    again = convert(str(tiny_hf_dir), str(out), ConvertOptions(dtype="fp32"))
    assert "nothing to do" in again.message
    assert (out / "manifest.json").stat().st_mtime_ns == stamp


def test_a_different_conversion_over_an_output_is_refused(
    tiny_hf_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    convert(str(tiny_hf_dir), str(out), ConvertOptions(dtype="fp32"))
    with pytest.raises(PublishError, match="--overwrite"):
        convert(str(tiny_hf_dir), str(out), ConvertOptions(dtype="bf16"))


def test_overwrite_replaces_an_output(tiny_hf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(str(tiny_hf_dir), str(out), ConvertOptions(dtype="fp32"))
    convert(str(tiny_hf_dir), str(out), ConvertOptions(dtype="bf16", overwrite=True))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["dtype"] == "bf16"
    for name, entry in manifest["files"].items():
        data = (out / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_destination_inside_source_is_refused(tiny_hf_dir: Path) -> None:
    with pytest.raises(PublishError, match="never writes"):
        convert(str(tiny_hf_dir), str(tiny_hf_dir / "out"))


@pytest.mark.parametrize("chunk_bytes", [None, 1000])
def test_a_corrupted_shard_fails_verification_and_publishes_nothing(
    tiny_hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_bytes: int | None
) -> None:
    if chunk_bytes:  # every tensor written and verified in many small chunks
        monkeypatch.setattr("ckpt_core.pipeline.stream.CHUNK_BYTES", chunk_bytes)
    out = tmp_path / "out"
    plan = core.plan_conversion(str(tiny_hf_dir), str(out), ConvertOptions(dtype="fp32"))
    work = Path(core.start(plan))
    files = [core.write_shard(plan, i) for i in range(len(plan.shards))]
    shard = work / plan.shards[0].filename
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # one flipped bit pattern in the last tensor's bytes
    shard.write_bytes(bytes(data))
    checks = [core.verify_one(plan, i) for i in range(len(plan.shards))]
    result = core.report(plan, checks, 0)
    assert not result.ok and len(result.mismatches) == 1
    with pytest.raises(VerifyError, match="nothing was published"):
        core.publish(plan, files, result)
    assert not out.exists() and not work.exists()


@pytest.mark.parametrize("to", ["dcp", "pth"])
def test_a_corrupted_training_format_output_fails_verification(
    tiny_hf_dir: Path, tmp_path: Path, to: Literal["dcp", "pth"]
) -> None:
    """The read-back verification of `--to dcp|pth`: one flipped byte inside a tensor's stored
    values (found by its bytes in the written file) is caught and nothing is published."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    options = ConvertOptions(dtype="fp32", to=to, stage="pretrain" if to == "pth" else None)
    plan = core.plan_conversion(str(tiny_hf_dir), str(out), options)
    work = Path(core.start(plan))
    files = [core.write_shard(plan, i) for i in range(len(plan.shards))]
    name = "model.norm.weight"
    values = load_file(tiny_hf_dir / "model.safetensors")[name].numpy().tobytes()
    written = [p for p in work.rglob("*") if p.is_file() and values in p.read_bytes()]
    assert len(written) == 1, "the tensor's bytes are stored once, uncompressed"
    data = bytearray(written[0].read_bytes())
    data[data.find(values) + len(values) // 2] ^= 0xFF
    written[0].write_bytes(bytes(data))
    checks = [core.verify_one(plan, i) for i in range(len(plan.shards))]
    result = core.report(plan, checks, 0)
    assert not result.ok and name in result.mismatches
    with pytest.raises(VerifyError, match="nothing was published"):
        core.publish(plan, files, result)
    assert not out.exists()


def test_memory_urls_end_to_end(
    tiny_model: Qwen2ForCausalLM, tiny_hf_dir: Path, tmp_path: Path
) -> None:
    import fsspec

    mem = fsspec.filesystem("memory")
    for p in tiny_hf_dir.iterdir():
        mem.pipe_file(f"/src-model/{p.name}", p.read_bytes())
    convert(
        "memory://src-model",
        "memory://converted",
        ConvertOptions(dtype="fp32", max_shard_bytes=200_000),
    )
    assert mem.exists("/converted/_SUCCESS")
    assert not mem.exists("/converted/.ckptflow-incomplete")
    local = tmp_path / "copy"
    mem.get("/converted/", str(local), recursive=True)
    _load(local)


def _save_single(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.mkdir(exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _restamp(path: Path, mtime_ns: int) -> None:
    """Sets the modification stamp a rewrite gets, without waiting for the clock to tick."""
    os.utime(path, ns=(path.stat().st_atime_ns, mtime_ns))


def test_a_changed_source_is_read_afresh_in_the_same_process(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _save_single(src, {"a": torch.ones(3)})
    convert(str(src), str(tmp_path / "one"), ConvertOptions(dtype="fp32"))
    before = (src / "model.safetensors").stat().st_mtime_ns
    _save_single(src, {"a": torch.full((5,), 2.0), "b": torch.zeros(2)})
    _restamp(src / "model.safetensors", before + 10**9)  # a new modification stamp
    convert(str(src), str(tmp_path / "two"), ConvertOptions(dtype="fp32"))
    with safe_open(str(tmp_path / "two" / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["a", "b"]
        assert torch.equal(f.get_tensor("a"), torch.full((5,), 2.0))


def test_a_source_changed_during_conversion_publishes_nothing(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _save_single(src, {"a": torch.ones(3)})
    plan = core.plan_conversion(str(src), str(out), ConvertOptions(dtype="fp32"))
    core.start(plan)
    files = [core.write_shard(plan, i) for i in range(len(plan.shards))]
    checks = [core.verify_one(plan, i) for i in range(len(plan.shards))]
    before = (src / "model.safetensors").stat().st_mtime_ns
    _save_single(src, {"a": torch.ones(3)})  # the trainer rewrote it, same bytes, new stamp
    _restamp(src / "model.safetensors", before + 10**9)
    with pytest.raises(SourceChangedError, match="changed while it was being converted"):
        core.publish(plan, files, core.report(plan, checks, 0))
    assert not out.exists()
