"""Layouts as trainers really write them: torchtitan's DCP, accelerate's FSDP dirs, DeepSpeed
without ZeRO, DDP/torch.compile prefixes, a lone weights file, a Trainer output_dir.

Each case is converted through the CLI and loaded strictly by transformers with values equal
to the truth the generator saved (the model's own state dict), or refused with one line and
nothing published.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptflow.cli import main
from tests.fixtures.fsdp_cache import cached_build, load_truth
from tests.fixtures.layouts_cache import HERE, layout_fixtures

__all__ = ["layout_fixtures"]  # the session fixture, used by name below


@pytest.fixture(scope="session")
def stage0_fixture() -> Path:
    root = cached_build("ds-stage0", HERE / "gen_ds_stage0.py", HERE / "gen_deepspeed.py")
    return root / "stage0"


def _convert(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["convert", *argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _refused(capsys: pytest.CaptureFixture[str], dst: Path, *argv: str) -> str:
    code, err = _convert(capsys, *argv, str(dst))
    assert code == 2, err
    assert err.startswith("ckptflow: error: "), err
    assert not dst.exists() and not list(dst.parent.glob(f".{dst.name}*"))
    return err


def _loads_as(out: Path, truth: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The output loads strictly and holds exactly the truth's values (in fp32)."""
    from transformers import Qwen2ForCausalLM

    model, info = Qwen2ForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    state = model.state_dict()
    assert set(state) == set(truth)
    for name, value in truth.items():
        assert torch.equal(state[name], value.float()), name
    manifest: dict[str, Any] = json.loads((out / "manifest.json").read_text())
    return manifest


def _notes(manifest: dict[str, Any]) -> str:
    return " ".join(manifest["source"]["notes"])


# -- torchtitan and accelerate DCP -----------------------------------------------------------
def test_torchtitan_dcp_model_keys_beside_trainer_state(
    layout_fixtures: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hf"
    src = layout_fixtures / "torchtitan"
    base = str(layout_fixtures / "base")
    code, text = _convert(capsys, str(src), str(out), "--dtype", "fp32", "--base", base)
    assert code == 0, text
    manifest = _loads_as(out, load_truth(layout_fixtures))
    notes = _notes(manifest)
    for top in ("'optimizer'", "'train_state'", "'lr_scheduler'", "'dataloader'"):
        assert top in notes, notes


def test_accelerate_fsdp_model_dir_converts(
    layout_fixtures: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hf"
    src = layout_fixtures / "accelerate" / "pytorch_model_fsdp_0"
    base = str(layout_fixtures / "base")
    code, text = _convert(capsys, str(src), str(out), "--dtype", "fp32", "--base", base)
    assert code == 0, text
    assert "'model'" in _notes(_loads_as(out, load_truth(layout_fixtures)))


def test_accelerate_optimizer_dir_is_refused_naming_the_model_dir(
    layout_fixtures: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = layout_fixtures / "accelerate" / "optimizer_0"
    err = _refused(capsys, tmp_path / "hf", str(src))
    assert len(err.strip().splitlines()) == 1, err
    assert "optimizer" in err and "not a model" in err
    assert str(layout_fixtures / "accelerate" / "pytorch_model_fsdp_0") in err


# -- DeepSpeed without ZeRO ------------------------------------------------------------------
def test_deepspeed_stage0_reads_the_16bit_module(
    stage0_fixture: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hf"
    src, base = str(stage0_fixture / "ckpt"), str(stage0_fixture / "base")
    code, text = _convert(capsys, src, str(out), "--dtype", "fp32", "--base", base)
    assert code == 0, text
    truth = load_truth(stage0_fixture)
    assert all(v.dtype == torch.bfloat16 for v in truth.values())
    notes = _notes(_loads_as(out, truth))
    assert "stage 0" in notes and "module" in notes


def test_deepspeed_stage0_named_zero_without_partitions_is_refused(
    stage0_fixture: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A ZeRO-2 checkpoint whose optimizer partitions are gone: its 16-bit module copy must not
    # pass for the model (the fp32 masters are what was trained).
    ckpt = tmp_path / "ckpt"
    shutil.copytree(stage0_fixture / "ckpt", ckpt)
    states = ckpt / "global_step2" / "mp_rank_00_model_states.pt"
    state = torch.load(states, weights_only=False)  # the fixture DeepSpeed wrote, trusted
    state["ds_config"]["zero_optimization"] = {"stage": 2}
    torch.save(state, states)
    err = _refused(capsys, tmp_path / "hf", str(ckpt))
    assert "ZeRO stage 2" in err and "partitions" in err, err


# -- DDP and torch.compile prefixes ----------------------------------------------------------
@pytest.mark.parametrize(
    ("file", "prefix"),
    [
        ("ddp/model.pth", "module."),
        ("compiled/model.pth", "_orig_mod."),
        ("compiled/model.safetensors", "_orig_mod."),
    ],
)
def test_wrapper_prefixes_stripped_when_that_gives_the_models_names(
    layout_fixtures: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    file: str,
    prefix: str,
) -> None:
    src = tmp_path / "run"
    src.mkdir()
    shutil.copy(layout_fixtures / file, src / Path(file).name)
    shutil.copy(layout_fixtures / "base" / "config.json", src / "config.json")
    out = tmp_path / "hf"
    code, text = _convert(capsys, str(src / Path(file).name), str(out), "--dtype", "fp32")
    assert code == 0, text
    notes = _notes(_loads_as(out, load_truth(layout_fixtures, "plain_truth.safetensors")))
    assert repr(prefix) in notes and "stripped" in notes


def test_strip_prefix_flag_without_config(
    layout_fixtures: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hf"
    src = layout_fixtures / "ddp" / "model.pth"
    code, text = _convert(
        capsys, str(src), str(out), "--dtype", "fp32", "--strip-prefix", "module."
    )
    assert code == 0, text
    from safetensors.torch import load_file

    written = load_file(str(out / "model.safetensors"))
    truth = load_truth(layout_fixtures, "plain_truth.safetensors")
    assert set(written) == set(truth)
    assert all(torch.equal(written[k], v) for k, v in truth.items())
    assert "--strip-prefix" in _notes(json.loads((out / "manifest.json").read_text()))


def test_names_left_alone_without_config_or_flag(layout_fixtures: Path) -> None:
    from ckpt_core.pipeline.conversion import ConvertOptions
    from ckpt_core.pipeline.source import open_source

    reader, _ = open_source(str(layout_fixtures / "ddp" / "model.pth"), ConvertOptions())
    assert all(name.startswith("module.") for name in reader.index())


# -- a lone weights file ---------------------------------------------------------------------
def test_lone_safetensors_file_with_base(
    layout_fixtures: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hf"
    src = layout_fixtures / "single" / "weights.safetensors"
    base = str(layout_fixtures / "base")
    code, text = _convert(capsys, str(src), str(out), "--dtype", "fp32", "--base", base)
    assert code == 0, text
    manifest = _loads_as(out, load_truth(layout_fixtures, "plain_truth.safetensors"))
    assert manifest["source"]["url"] == str(src)


def test_lone_safetensors_file_with_config_beside_it(
    layout_fixtures: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "run"
    src.mkdir()
    shutil.copy(layout_fixtures / "single" / "weights.safetensors", src / "step_100.safetensors")
    shutil.copy(layout_fixtures / "base" / "config.json", src / "config.json")
    (src / "notes.safetensors").write_bytes(b"")  # another file beside it is not read
    out = tmp_path / "hf"
    code, text = _convert(capsys, str(src / "step_100.safetensors"), str(out), "--dtype", "fp32")
    assert code == 0, text
    _loads_as(out, load_truth(layout_fixtures, "plain_truth.safetensors"))


# -- a Trainer output_dir --------------------------------------------------------------------
@pytest.fixture
def output_dir(layout_fixtures: Path, tmp_path: Path) -> Path:
    """A Trainer-like output_dir: checkpoint-500 is older than checkpoint-1000 (numerically)."""
    root = tmp_path / "output_dir"
    for step in (500, 1000, 90):
        shutil.copytree(
            layout_fixtures / "accelerate" / "pytorch_model_fsdp_0", root / f"checkpoint-{step}"
        )
    newest = root / "checkpoint-1000"
    shutil.rmtree(newest)
    shutil.copytree(layout_fixtures / "torchtitan", newest)  # the one expected, distinct
    for step in (500, 1000, 90):
        shutil.copy(layout_fixtures / "base" / "config.json", root / f"checkpoint-{step}")
    (root / "runs").mkdir()
    return root


def test_output_dir_is_refused_listing_its_checkpoints(
    output_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _refused(capsys, tmp_path / "hf", str(output_dir))
    assert len(err.strip().splitlines()) == 1, err
    assert "checkpoint-1000, checkpoint-500, checkpoint-90" in err and "--latest" in err


def test_latest_converts_the_newest_checkpoint(
    output_dir: Path, layout_fixtures: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hf"
    code, text = _convert(capsys, str(output_dir), str(out), "--dtype", "fp32", "--latest")
    assert code == 0, text
    manifest = _loads_as(out, load_truth(layout_fixtures))
    assert manifest["source"]["url"] == str(output_dir / "checkpoint-1000")
    assert "'optimizer'" in _notes(manifest)  # torchtitan's layout: checkpoint-1000 itself


def test_latest_without_checkpoints_is_refused(
    layout_fixtures: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = str(layout_fixtures / "torchtitan")
    err = _refused(capsys, tmp_path / "hf", src, "--latest")
    assert "no checkpoint-N" in err


def test_prefixes_left_alone_when_stripping_does_not_give_the_models_names(
    layout_fixtures: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    from ckpt_core.pipeline.conversion import ConvertOptions
    from ckpt_core.pipeline.source import open_source

    state = load_file(str(layout_fixtures / "compiled" / "model.safetensors"))
    state["_orig_mod.model.extra.weight"] = torch.ones(2)  # not one of the model's names
    save_file(state, str(tmp_path / "weights.safetensors"))
    shutil.copy(layout_fixtures / "base" / "config.json", tmp_path / "config.json")
    reader, _ = open_source(str(tmp_path / "weights.safetensors"), ConvertOptions())
    assert set(reader.index()) == set(state)


def test_strip_prefix_that_merges_two_names_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from ckpt_core.errors import FormatError
    from ckpt_core.pipeline.conversion import ConvertOptions
    from ckpt_core.pipeline.source import open_source

    save_file({"a.w": torch.ones(1), "b.a.w": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    options = ConvertOptions(strip_prefix=("b.",))
    with pytest.raises(FormatError, match="both become 'a.w'"):
        open_source(str(tmp_path / "w.safetensors"), options)
