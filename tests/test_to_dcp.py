"""HF -> torch Distributed Checkpoint (`--to dcp`): what `dcp.load` and a 2-rank FSDP2 run read
is the model the HF directory holds; back to HF through ckptflow's own DCP reader, the bytes of
a direct conversion."""

from __future__ import annotations

import hashlib
import json
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ckpt_core.formats.dcp import METADATA
from ckpt_core.formats.unpickle import DCP_METADATA, restricted_load
from ckpt_core.pipeline.conversion import options_from
from ckpt_core.pipeline.convert import convert
from ckptflow.cli import main
from tests.fixtures.launch import REPO, torchrun_command

TO_DCP = ["--to", "dcp", "--dcp-key", "model"]


def _fresh(config_dir: Path, seed: int = 99) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)  # weights unlike the source's
    model: torch.nn.Module = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(config_dir)
    )
    return model


def _dcp_load(state: dict[str, object], path: Path) -> None:
    from torch.distributed.checkpoint.state_dict_loader import load

    with warnings.catch_warnings():  # one process on purpose
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        load(state, checkpoint_id=str(path), no_dist=True)


def _fqns(path: Path) -> set[str]:
    meta = restricted_load((path / METADATA).read_bytes(), str(path), DCP_METADATA)
    return set(meta.field("state_dict_metadata"))


def _manifest_ok(path: Path) -> dict[str, Any]:
    assert (path / "_SUCCESS").exists()
    manifest = json.loads((path / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["size"], entry["sha256"])
    return dict(manifest)


@pytest.fixture(scope="module")
def tied_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.tiny import build_tiny_qwen2

    path = tmp_path_factory.mktemp("tied-hf")
    build_tiny_qwen2(seed=3, tie_word_embeddings=True).save_pretrained(path)
    return path


def test_dcp_load_into_a_fresh_model_gives_the_source(tiny_hf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "dcp"
    assert main(["convert", str(tiny_hf_dir), str(out), *TO_DCP]) == 0
    manifest = _manifest_ok(out)
    assert {".metadata", "__0_0.distcp", "config.json"} <= set(manifest["files"])
    assert manifest["options"]["dtype"] == "keep"
    source = load_file(tiny_hf_dir / "model.safetensors")
    assert _fqns(out) == {f"model.{n}" for n in source}  # nested under the key, nothing else

    model = _fresh(out)  # the config travelled with the checkpoint
    state = model.state_dict()
    assert any(not torch.equal(state[n], t) for n, t in source.items())
    _dcp_load({"model": state}, out)
    assert set(state) == set(source)
    for name, tensor in source.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name


def test_no_key_is_flat_and_tied_copies_are_written(tied_hf_dir: Path, tmp_path: Path) -> None:
    """save_pretrained leaves the tied head out; model.state_dict() (what dcp.load fills) has it."""
    out = tmp_path / "dcp"
    convert(str(tied_hf_dir), str(out), options_from(to="dcp", dtype="bf16"))
    source = load_file(tied_hf_dir / "model.safetensors")
    assert "lm_head.weight" not in source
    assert _fqns(out) == set(source) | {"lm_head.weight"}
    model = _fresh(out).to(torch.bfloat16)
    state = model.state_dict()
    _dcp_load(state, out)
    for name, tensor in source.items():
        assert torch.equal(state[name], tensor.to(torch.bfloat16)), name
    assert torch.equal(state["lm_head.weight"], source["model.embed_tokens.weight"].bfloat16())


def test_round_trip_through_ckptflow_dcp_reader_gives_the_original_bytes(
    tiny_hf_dir: Path, tmp_path: Path
) -> None:
    args = ["--dtype", "fp32"]
    assert main(["convert", str(tiny_hf_dir), str(tmp_path / "dcp"), *TO_DCP]) == 0
    assert main(["convert", str(tmp_path / "dcp"), str(tmp_path / "back"), *args]) == 0
    original = load_file(tiny_hf_dir / "model.safetensors")
    again = load_file(tmp_path / "back" / "model.safetensors")
    assert original.keys() == again.keys()
    for name, tensor in original.items():
        assert (
            tensor.view(torch.uint8).numpy().tobytes()
            == again[name].view(torch.uint8).numpy().tobytes()
        )


def test_same_conversion_same_bytes_and_a_rerun_is_a_no_op(
    tiny_hf_dir: Path, tmp_path: Path
) -> None:
    """No path or random id inside .metadata: two destinations hold byte-identical files."""
    for name in ("a", "b"):
        convert(str(tiny_hf_dir), str(tmp_path / name), options_from(to="dcp", dcp_key="model"))
    a, b = (sorted((tmp_path / n).iterdir()) for n in ("a", "b"))
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    again = convert(str(tiny_hf_dir), str(tmp_path / "a"), options_from(to="dcp", dcp_key="model"))
    assert "nothing to do" in again.message


def test_to_an_object_store_url(tiny_hf_dir: Path, tmp_path: Path) -> None:
    """DCP's writer goes through the destination's storage: an fsspec URL works like a path."""
    import fsspec

    dst = f"memory://to-dcp-{tmp_path.name}/dcp"
    convert(str(tiny_hf_dir), dst, options_from(to="dcp", dcp_key="model"))
    listed = {p.rsplit("/", 1)[1] for p in fsspec.filesystem("memory").ls(dst, detail=False)}
    assert {".metadata", "__0_0.distcp", "manifest.json", "_SUCCESS"} <= listed
    convert(dst, str(tmp_path / "back"), options_from(dtype="keep"))
    again = load_file(tmp_path / "back" / "model.safetensors")
    for name, tensor in load_file(tiny_hf_dir / "model.safetensors").items():
        assert torch.equal(again[name], tensor), name


def test_dcp_writer_holds_one_tensor_at_a_time(tmp_path: Path) -> None:
    """DCP asks for each tensor when it writes it; the one before is released by then (DCP's
    writer would otherwise keep every tensor it wrote: the whole state dict)."""
    from ckpt_core.io.storage import Location
    from ckpt_core.pipeline.to_dcp import write_dcp

    made: list[torch.Tensor] = []

    def produce(name: str) -> torch.Tensor:
        assert all(t.untyped_storage().nbytes() == 0 for t in made), name
        made.append(torch.full((64, 32), float(len(made))))
        return made[-1]

    layout = [(f"layers.{i}.weight", torch.float32, (64, 32)) for i in range(5)]
    write_dcp(Location(str(tmp_path)), layout, produce, key="model", data_file="__0_0.distcp")
    assert len(made) == 5 and all(t.untyped_storage().nbytes() == 0 for t in made)
    state = {name: torch.zeros(shape) for name, _, shape in layout}
    _dcp_load({"model": state}, tmp_path)
    for i in range(5):
        assert torch.equal(state[f"layers.{i}.weight"], torch.full((64, 32), float(i)))


def test_dcp_output_trains_under_fsdp2(tiny_hf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "dcp"
    assert main(["convert", str(tiny_hf_dir), str(out), *TO_DCP]) == 0
    result = tmp_path / "fsdp.json"
    script = REPO / "tests" / "helpers" / "fsdp_resume.py"
    command, env = torchrun_command(script, 2, str(tiny_hf_dir), str(out), "model", str(result))
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = load_file(f"{result}.loaded.safetensors")
    source = load_file(tiny_hf_dir / "model.safetensors")
    assert loaded.keys() == source.keys()
    for name, tensor in source.items():
        assert torch.equal(loaded[name], tensor), name
    report = json.loads(result.read_text())
    assert torch.isfinite(torch.tensor(report["loss"])) and report["moved"] > 0  # one real step


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--dcp-key", "model"], "--dcp-key is for --to dcp"),
        (["--to", "dcp", "--dcp-key", "optimizer"], "--dcp-key 'optimizer'"),
        (["--to", "dcp", "--stage", "pretrain"], "--stage: for --to pth"),
    ],
)
def test_flags_of_another_target_are_refused(
    tiny_hf_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    says: str,
) -> None:
    assert main(["convert", str(tiny_hf_dir), str(tmp_path / "out"), *flags]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.prefect
def test_flow_round_trip_hf_dcp_hf(
    prefect_harness: None, tiny_hf_dir: Path, tmp_path: Path
) -> None:
    from flows.convert import convert_flow

    there = convert_flow(str(tiny_hf_dir), str(tmp_path / "dcp"), to="dcp", dcp_key="model")
    assert there["published"] and there["tensors"] == len(
        load_file(tiny_hf_dir / "model.safetensors")
    )
    assert main(["convert", str(tiny_hf_dir), str(tmp_path / "cli"), *TO_DCP]) == 0
    for path in (tmp_path / "cli").iterdir():  # the flow and the CLI: the same bytes
        assert path.read_bytes() == (tmp_path / "dcp" / path.name).read_bytes(), path.name
    model = _fresh(tmp_path / "dcp")
    state = model.state_dict()
    _dcp_load({"model": state}, tmp_path / "dcp")
    back = convert_flow(str(tmp_path / "dcp"), str(tmp_path / "back"), dtype="fp32")
    assert back["published"]
    original = load_file(tiny_hf_dir / "model.safetensors")
    again = load_file(tmp_path / "back" / "model.safetensors")
    for name, tensor in original.items():
        assert torch.equal(again[name], tensor) and torch.equal(state[name], tensor), name
