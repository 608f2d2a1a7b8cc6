"""Tensor-parallel roles, the tp-ranks reader and `ckptflow merge` on a tiny Qwen2.5-VL.

Truth is the model transformers saved before the split: HF -> split -> shard to N ranks
(no training) -> merge must give back every tensor bit for bit and identical logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ckpt_core.errors import FormatError, KeyMismatchError
from ckpt_core.families import tp_roles
from ckpt_core.families.qwen2_5_vl import TEXT_ROLES, VISION_ROLES
from ckpt_core.formats.protocol import OpenOptions
from ckpt_core.formats.registry import detect, open_reader
from ckpt_core.vlm.merge import merge
from ckpt_core.vlm.split import split
from ckpt_core.vlm.tiny_trainer import train
from tests.fixtures.tiny_vlm import VOCAB, sample_batch, save_tiny_vlm

# -- roles (pure) ----------------------------------------------------------------------------


def test_fused_qkv_rank_pieces_are_q_k_v_slices_and_merge_back() -> None:
    hidden, size = 8, 2
    q, k, v = (torch.randn(hidden, 4) + i for i in range(3))
    full = torch.cat([q, k, v])
    pieces = [tp_roles.shard("qkv", full, tp_roles.FUSED_QKV, r, size) for r in range(size)]
    # rank r holds [q_r; k_r; v_r]
    assert torch.equal(pieces[1], torch.cat([q[4:], k[4:], v[4:]]))
    assert torch.equal(tp_roles.merge("qkv", tp_roles.FUSED_QKV, pieces), full)
    # Concatenating the pieces naively would interleave q and k: the role matters.
    assert not torch.equal(torch.cat(pieces), full)


def test_vocab_padding_is_trimmed() -> None:
    embed = torch.randn(7, 4)
    pieces = [tp_roles.shard("e", embed, tp_roles.VOCAB, r, 4) for r in range(4)]
    assert [p.shape[0] for p in pieces] == [2, 2, 2, 2]
    assert torch.equal(tp_roles.merge("e", tp_roles.VOCAB, pieces, vocab_size=7), embed)
    with pytest.raises(FormatError, match="fewer than"):
        tp_roles.merged_shape("e", tp_roles.VOCAB, [(2, 4)] * 3, vocab_size=7)


def test_row_bias_is_replicated_and_row_pieces_merge_on_dim_1() -> None:
    assert TEXT_ROLES.role_of("layers.3.self_attn.o_proj.weight") == tp_roles.ROW
    assert VISION_ROLES.role_of("blocks.0.attn.proj.bias") == tp_roles.REPLICATED
    assert VISION_ROLES.role_of("merger.mlp.0.bias") == tp_roles.COLUMN
    assert VISION_ROLES.role_of("merger.mlp.2.weight") == tp_roles.ROW
    w = torch.randn(4, 6)
    rows = [tp_roles.shard("w", w, tp_roles.ROW, r, 2) for r in range(2)]
    assert rows[0].shape == (4, 3) and torch.equal(tp_roles.merge("w", tp_roles.ROW, rows), w)


def test_disagreeing_pieces_and_unknown_names_are_errors() -> None:
    with pytest.raises(KeyMismatchError, match="mystery"):
        TEXT_ROLES.role_of("layers.0.mystery.weight")
    with pytest.raises(FormatError, match="differs between rank 0 and rank 1"):
        tp_roles.merge("n", tp_roles.REPLICATED, [torch.ones(3), torch.zeros(3)])
    with pytest.raises(FormatError, match="may differ only on dim 1"):
        tp_roles.merged_shape("o", tp_roles.ROW, [(4, 3), (5, 3)])


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Base model dir, its saved weights, and its split (untied, vocab 397: padding at N=2, 4)."""
    root = tmp_path_factory.mktemp("vlm")
    model = save_tiny_vlm(root / "base")
    split(str(root / "base"), str(root / "split"))
    weights = load_file(root / "base" / "model.safetensors")
    return {"root": root, "model": model, "weights": weights}


def _assert_same_model(out: Path, vlm: dict[str, Any]) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration

    loaded: Any = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    merged, info = loaded
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    reference = vlm["model"]
    ours, theirs = merged.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
    batch = sample_batch(reference)
    with torch.no_grad():
        assert torch.equal(merged.eval()(**batch).logits, reference(**batch).logits)


# -- reader ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 4])
def test_reader_rebuilds_every_saved_tensor(vlm: dict[str, Any], size: int) -> None:
    root = vlm["root"]
    epoch = root / f"epoch-reader-{size}"
    train(str(root / "split"), str(epoch), size, steps=0)
    assert detect(str(epoch)).name == "tp-ranks"
    reader = open_reader(str(epoch), OpenOptions(base=str(root / "base")))
    index = reader.index()
    weights = vlm["weights"]
    assert list(index) and set(index) == set(weights)
    for name, tensor in weights.items():
        assert index[name].shape == tuple(tensor.shape) and index[name].dtype == tensor.dtype
        assert torch.equal(reader.read(name), tensor), name
    if size > 1:
        text = torch.load(epoch / "text" / "rank_0.pt", weights_only=True)["model"]
        assert text["embed_tokens.weight"].shape[0] == -(-VOCAB // size)  # padded rows
        assert text["layers.0.self_attn.o_proj.weight"].shape == (64, 64 // size)


# -- merge -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 4])
def test_round_trip_is_exact(vlm: dict[str, Any], size: int) -> None:
    root = vlm["root"]
    epoch, out = root / f"epoch-{size}", root / f"merged-{size}"
    train(str(root / "split"), str(epoch), size, steps=0)
    merge(str(epoch), str(out), str(root / "base"), max_shard_bytes=300_000)
    assert (out / "_SUCCESS").exists() and (out / "model.safetensors.index.json").exists()
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    meta = json.loads((out / "merge_metadata.json").read_text())
    assert meta["parallel_sizes"] == {"vision": size, "text": size}
    assert "merge_metadata.json" in json.loads((out / "manifest.json").read_text())["files"]
    _assert_same_model(out, vlm)


def test_round_trip_tied_embeddings(tmp_path: Path) -> None:
    model = save_tiny_vlm(tmp_path / "base", tie_word_embeddings=True)
    split(str(tmp_path / "base"), str(tmp_path / "split"))
    train(str(tmp_path / "split"), str(tmp_path / "epoch"), 2, steps=0)
    merge(str(tmp_path / "epoch"), str(tmp_path / "out"), str(tmp_path / "base"))
    names = set(load_file(tmp_path / "out" / "model.safetensors"))
    assert "lm_head.weight" not in names
    assert names == set(load_file(tmp_path / "base" / "model.safetensors"))
    _assert_same_model(tmp_path / "out", {"model": model})


def test_bin_format_round_trip(vlm: dict[str, Any]) -> None:
    root = vlm["root"]
    train(str(root / "split"), str(root / "epoch-bin"), 2, steps=0)
    merge(
        str(root / "epoch-bin"), str(root / "merged-bin"), str(root / "base"), output_format="bin"
    )
    assert (root / "merged-bin" / "pytorch_model.bin").exists()
    assert not list((root / "merged-bin").glob("*.safetensors"))
    _assert_same_model(root / "merged-bin", vlm)


def test_after_training_weights_move_and_load_strictly(vlm: dict[str, Any]) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration

    root = vlm["root"]
    result = train(str(root / "split"), str(root / "epoch-trained"), 2, steps=2)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    merge(str(root / "epoch-trained"), str(root / "merged-trained"), str(root / "base"))
    loaded: Any = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        root / "merged-trained", output_loading_info=True
    )
    merged, info = loaded
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ours, theirs = merged.state_dict(), vlm["model"].state_dict()
    changed = {n for n in theirs if not torch.equal(ours[n], theirs[n])}
    for name in (
        "lm_head.weight",
        "model.language_model.embed_tokens.weight",
        "model.visual.blocks.0.attn.qkv.weight",
        "model.visual.merger.mlp.2.weight",
        "model.language_model.norm.weight",
    ):
        assert name in changed, name
    assert len(changed) == len(theirs)


# -- errors ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def epoch2(vlm: dict[str, Any]) -> Path:
    path = vlm["root"] / "epoch-errors"
    train(str(vlm["root"] / "split"), str(path), 2, steps=0)
    return path


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _open(epoch: Path, vlm: dict[str, Any], **kw: Any) -> Any:
    return open_reader(str(epoch), OpenOptions(base=str(vlm["root"] / "base"), **kw), "tp-ranks")


def test_parallel_size_disagreement_and_missing_or_stale_ranks(
    vlm: dict[str, Any], epoch2: Path, tmp_path: Path
) -> None:
    with pytest.raises(FormatError, match="parallel_size is 2 but --parallel-size is 4"):
        _open(epoch2, vlm, parallel_size=4)
    missing = _copy(epoch2, tmp_path / "missing")
    (missing / "text" / "rank_1.pt").unlink()
    with pytest.raises(FormatError, match="expected rank_0.pt .. rank_1.pt"):
        _open(missing, vlm)
    stale = _copy(epoch2, tmp_path / "stale")
    (stale / "vision" / "rank_2.pt").write_bytes((stale / "vision" / "rank_1.pt").read_bytes())
    with pytest.raises(FormatError, match="rank_2.pt"):
        _open(stale, vlm)


def _rewrite(path: Path, edit: Any) -> None:
    state = torch.load(path, weights_only=True)
    edit(state["model"])
    torch.save(state, path)


def test_diverged_replica_unknown_tensor_and_missing_head_are_named(
    vlm: dict[str, Any], epoch2: Path, tmp_path: Path
) -> None:
    diverged = _copy(epoch2, tmp_path / "diverged")
    _rewrite(diverged / "text" / "rank_1.pt", lambda sd: sd["norm.weight"].add_(1e-3))
    reader = _open(diverged, vlm)
    with pytest.raises(FormatError, match="norm.weight.*differs between rank 0 and rank 1"):
        reader.read("model.norm.weight")

    unknown = _copy(epoch2, tmp_path / "unknown")
    for rank in (0, 1):
        _rewrite(
            unknown / "vision" / f"rank_{rank}.pt",
            lambda sd: sd.__setitem__("blocks.0.attn.extra", torch.zeros(2)),
        )
    with pytest.raises(KeyMismatchError, match="blocks.0.attn.extra"):
        _open(unknown, vlm)

    headless = _copy(epoch2, tmp_path / "headless")
    for rank in (0, 1):
        _rewrite(headless / "text" / f"rank_{rank}.pt", lambda sd: sd.pop("lm_head.weight"))
    with pytest.raises(KeyMismatchError, match="lm_head"):
        _open(headless, vlm)


def _as_dtensors(epoch: Path, size: int, bad: str | None = None) -> None:
    """Re-save rank files as DTensor local shards, placed per role (as a TP run would)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    tables = {"vision": VISION_ROLES, "text": TEXT_ROLES}
    for rank in range(size):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=size)
        try:
            mesh = init_device_mesh("cpu", (size,))
            for part, table in tables.items():
                path = epoch / part / f"rank_{rank}.pt"
                plain = torch.load(path, weights_only=True)["model"]
                wrapped = {}
                for name, tensor in plain.items():
                    dim = table.role_of(name).dim
                    if name == bad:
                        dim = 0 if dim is None else None
                    place = Replicate() if dim is None else Shard(dim)
                    wrapped[name] = DTensor.from_local(tensor, mesh, [place], run_check=False)
                torch.save({"model": wrapped}, path)
        finally:
            dist.destroy_process_group()


def test_dtensor_local_shards_merge_exactly(vlm: dict[str, Any], tmp_path: Path) -> None:
    root = vlm["root"]
    train(str(root / "split"), str(tmp_path / "epoch"), 2, steps=0)
    _as_dtensors(tmp_path / "epoch", 2)
    merge(str(tmp_path / "epoch"), str(tmp_path / "out"), str(root / "base"))
    _assert_same_model(tmp_path / "out", vlm)

    train(str(root / "split"), str(tmp_path / "bad"), 2, steps=0)
    _as_dtensors(tmp_path / "bad", 2, bad="layers.0.input_layernorm.weight")
    with pytest.raises(FormatError, match="input_layernorm.*disagrees with its declared role"):
        _open(tmp_path / "bad", vlm)
