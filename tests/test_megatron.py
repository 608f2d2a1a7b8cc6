"""Megatron-core torch_dist checkpoints written by megatron-core itself on CPU (TP=2, PP=2, GQA,
MHA/MQA, tied and untied, bf16 and fp32; Megatron-LM, NeMo 2, verl and bare layouts): converted
by ckptflow, the HF model's logits equal Megatron's own forward on the same input."""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed import checkpoint as dcp

from ckpt_core.errors import ConfigError, FormatError
from ckpt_core.families.megatron_gpt import GptShape, plan_pieces
from ckpt_core.formats.dcp import DcpReader
from ckpt_core.formats.megatron import MegatronReader, find_checkpoint, read_box
from ckpt_core.formats.protocol import OpenOptions
from ckpt_core.formats.registry import detect
from ckpt_core.formats.torchzip import LazyTensor
from ckpt_core.io.storage import Location
from ckpt_core.pipeline.conversion import options_from
from ckpt_core.pipeline.convert import convert
from ckptflow.cli import main
from tests.fixtures.megatron_gen import CASES, AttnBackend
from tests.helpers.megatron_truth import hf_logits, mg_root, reference

__all__ = ["mg_root"]  # the session fixture, used by name

NESTED = {"megatron-lm": "iter_0000007", "nemo": "weights", "verl": "actor/dist_ckpt", "bare": ""}


def _convert(src: Path, dst: Path, base: Path) -> None:
    convert(str(src), str(dst), options_from(dtype="fp32", base=str(base)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_megatron(mg_root: Path, tmp_path: Path, case: str) -> None:
    root = mg_root / case
    ckpt = root / "ckpt"
    assert detect(str(ckpt)).name == "megatron"
    assert find_checkpoint(Location(str(ckpt))) == NESTED[CASES[case]["layout"]]
    _convert(ckpt, tmp_path / "out", root / "base")
    got, want = hf_logits(tmp_path / "out"), reference(root)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["format"] == "megatron"
    assert manifest["source"]["keys"].startswith("keys checked against")


def _read_whole(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist dir, by torch's own DCP loader."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(ckpt_dir)).read_metadata()
    state = {
        k: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for k, md in meta.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }
    dcp.load(state, checkpoint_id=str(ckpt_dir), no_dist=True)
    return state


def test_common_state_inside_distcp_files(mg_root: Path, tmp_path: Path) -> None:
    """megatron-core 0.17+ keeps the common state as pickled byte items inside the distcp files
    (0.16.1, installed here, writes common.pt): rebuilt with plain `dcp.save`, stacked tensors
    each one whole chunk. The pickles name classes off every allow-list: never unpickled."""
    case = mg_root / "llama_tp2_gqa"
    tensors = _read_whole(case / "ckpt" / "iter_0000007")
    args = pickle.dumps({"attention_backend": AttnBackend.local, "iteration": 7})
    state: dict[str, object] = dict(tensors)
    state["common_state/args"] = io.BytesIO(args)
    state["common_state/iteration"] = io.BytesIO(pickle.dumps(7))
    state["decoder.layers.mlp.linear_fc1._extra_state/shard_0_1"] = io.BytesIO(b"")
    src = tmp_path / "v017"
    dcp.save(state, checkpoint_id=str(src), no_dist=True)
    (src / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    assert not (src / "common.pt").exists()
    assert detect(str(src)).name == "megatron"
    _convert(src, tmp_path / "out", case / "base")
    torch.testing.assert_close(hf_logits(tmp_path / "out"), reference(case), rtol=1e-5, atol=1e-5)


def test_ranges_and_boxes_equal_the_whole_tensor(
    mg_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every HF tensor read by ranges of odd sizes (rows cut in the middle, across query groups
    and TP chunks) equals the tensor read whole; boxes equal slices of torch's own assembly."""
    case = mg_root / "qwen3_tp2_mha"
    reader = MegatronReader(Location(str(case / "ckpt")), OpenOptions(base=str(case / "base")))

    def whole(*_: object) -> None:
        raise AssertionError("a stacked tensor or a whole chunk was read")

    # Streamed: never the stacked tensor whole, never a chunk materialised.
    monkeypatch.setattr(DcpReader, "read", whole)
    monkeypatch.setattr(LazyTensor, "materialize", whole)
    for name, info in reader.index().items():
        whole = reader.read(name).reshape(-1)
        step = 37
        parts = [
            reader.read_range(name, s, min(step, info.numel - s))
            for s in range(0, info.numel, step)
        ]
        assert torch.equal(torch.cat(parts), whole), name
    dist_dir = case / "ckpt" / "actor" / "dist_ckpt"
    truth = _read_whole(dist_dir)
    dcp_reader = DcpReader(Location(str(dist_dir)))
    name = "decoder.layers.mlp.linear_fc2.weight"  # [L, H, I] cut along I by TP
    for box in [((1, 3, 5), (2, 7, 80)), ((0, 0, 0), (4, 64, 96)), ((3, 63, 47), (1, 1, 2))]:
        got = read_box(dcp_reader.pieces(name), box, torch.float32)
        want = truth[name][tuple(slice(o, o + s) for o, s in zip(*box, strict=True))]
        assert torch.equal(got, want.reshape(-1)), box


def _base_with(tmp_path: Path, case: Path, **changes: object) -> Path:
    base = tmp_path / "base"
    shutil.copytree(case / "base", base)
    config = json.loads((base / "config.json").read_text())
    config.update(changes)
    (base / "config.json").write_text(json.dumps(config))
    return base


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"num_key_value_heads": 1}, "linear_qkv.weight"),
        ({"hidden_size": 128}, "hidden_size"),
        ({"num_hidden_layers": 3}, "num_hidden_layers"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings=true"),
        ({"vocab_size": 200}, "fewer rows than vocab_size"),
    ],
)
def test_mismatched_base_refused_before_writing(
    mg_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    changes: dict[str, object],
    says: str,
) -> None:
    case = mg_root / "llama_tp2_gqa"
    base = _base_with(tmp_path, case, **changes)
    dst = tmp_path / "out"
    assert main(["convert", str(case / "ckpt"), str(dst), "--base", str(base)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ckptflow: error: ") and says in err and "\n" not in err, err
    assert not dst.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_without_base_refused(mg_root: Path) -> None:
    with pytest.raises(ConfigError, match="pass --base"):
        MegatronReader(Location(str(mg_root / "mistral_pp2_gqa" / "ckpt")), OpenOptions())


def test_latest_file_never_names_a_path(mg_root: Path, tmp_path: Path) -> None:
    """`latest_checkpointed_iteration.txt` says an iteration (or `release`), not where to read."""
    src = tmp_path / "run"
    shutil.copytree(mg_root / "llama_tp2_gqa" / "ckpt", src)
    (src / "latest_checkpointed_iteration.txt").write_text("../run/iter_0000007")
    assert find_checkpoint(Location(str(src))) is None
    (src / "latest_checkpointed_iteration.txt").write_text("7\n")
    assert find_checkpoint(Location(str(src))) == "iter_0000007"


def test_moe_and_unknown_tensors_refused_by_name() -> None:
    model = GptShape("qwen2", 2, 8, 2, 1, 4, 16, 10, False)
    moe = {"decoder.layers.mlp.experts.experts.linear_fc1.weight": (2, 4, 32, 8)}
    with pytest.raises(FormatError, match="MoE experts .* not supported yet"):
        plan_pieces(moe, model, where="ckpt", base="base")
    with pytest.raises(FormatError, match="without a GPT rule.*decoder.layers.foo.weight"):
        plan_pieces({"decoder.layers.foo.weight": (2, 8)}, model, where="ckpt", base="base")


@pytest.mark.prefect
def test_flow_output_is_byte_identical_to_cli(
    prefect_harness: None, mg_root: Path, tmp_path: Path
) -> None:
    case = mg_root / "qwen2_pp2_tied_bf16"
    args = ["--base", str(case / "base")]
    assert main(["convert", str(case / "ckpt"), str(tmp_path / "cli"), *args]) == 0
    assert main(["convert", str(case / "ckpt"), str(tmp_path / "flow"), *args, "--prefect"]) == 0
    files = sorted(p.name for p in (tmp_path / "cli").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "flow").iterdir())
    for name in files:
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "flow" / name).read_bytes()
