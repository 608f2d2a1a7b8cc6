"""The drop-in commands (`ds2hf`, `fsdp2hf`, `hf2fsdp`) take the old scripts' flags and give
byte for byte what the equivalent `ckptflow convert` gives (bagel2hf: tests/test_bagel.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ckptflow.cli import main
from tests.fixtures.fsdp_cache import fsdp_fixtures
from tests.helpers.cli_runs import tree
from tests.helpers.deepspeed_truth import ckpt

__all__ = ["fsdp_fixtures"]  # the session fixture, imported for pytest


def test_ds2hf_is_convert_with_the_zero_scripts_flags(ds_root: Path, tmp_path: Path) -> None:
    src = ckpt(ds_root, "stage3")
    base = str(ds_root / "stage3" / "base")
    step = next(p for p in Path(src).iterdir() if p.name.startswith("global_step"))
    alias, plain = tmp_path / "alias", tmp_path / "plain"
    # the step folder itself, with the tag flag's short spelling
    assert main(["ds2hf", "--checkpoint_dir", str(step), "--output_dir", str(alias),
                 "--hf_base", base, "-t", step.name, "--model_type", "causal"]) == 0  # fmt: skip
    assert main(["convert", str(step), str(plain), "--base", base, "--tag", step.name]) == 0
    assert tree(alias) == tree(plain)
    assert (alias / "config.json").exists() and (alias / "manifest.json").exists()


def test_ds2hf_exclude_frozen_is_convert_exclude_frozen(ds_root: Path, tmp_path: Path) -> None:
    src, base = ckpt(ds_root, "stage2"), str(ds_root / "stage2" / "base")
    alias, plain = tmp_path / "alias", tmp_path / "plain"
    assert main(["ds2hf", "--checkpoint_dir", src, "--output_dir", str(alias), "--hf_base", base,
                 "--exclude_frozen_parameters", "--dtype", "fp32"]) == 0  # fmt: skip
    assert main(["convert", src, str(plain), "--base", base, "--exclude-frozen",
                 "--dtype", "fp32"]) == 0  # fmt: skip
    assert tree(alias) == tree(plain)


def test_ds2hf_model_type_disagreeing_with_the_base_is_one_line(
    ds_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main(["ds2hf", "--checkpoint_dir", ckpt(ds_root, "stage3"), "--output_dir", str(out),
                 "--hf_base", str(ds_root / "stage3" / "base"), "--model_type", "vision2seq"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--model_type vision2seq" in err[0], err
    assert "ForCausalLM" in err[0] and not out.exists()


def test_fsdp2hf_is_convert(fsdp_fixtures: Path, tmp_path: Path) -> None:
    src, base = str(fsdp_fixtures / "dcp"), str(fsdp_fixtures / "base")
    alias, plain = tmp_path / "alias", tmp_path / "plain"
    assert main(["fsdp2hf", "--hf_base", base, "--checkpoint_dir", src,
                 "--output_dir", str(alias)]) == 0  # fmt: skip
    assert main(["convert", src, str(plain), "--base", base]) == 0
    assert tree(alias) == tree(plain)


def test_hf2fsdp_is_convert_to_dcp(tiny_hf_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, src)
    alias, plain = tmp_path / "alias", tmp_path / "plain"
    assert main(["hf2fsdp", "--hf_checkpoint", str(src), "--output", str(alias)]) == 0
    assert main(["convert", str(src), str(plain), "--to", "dcp"]) == 0
    assert tree(alias) == tree(plain)
    assert (alias / ".metadata").exists()


@pytest.mark.parametrize("models", ["both", "ema"])
def test_bagel2hf_is_convert_with_models(tmp_path: Path, models: str) -> None:
    from tests.fixtures.bagel_cache import build_bagel_fixtures

    bagel = build_bagel_fixtures()
    src, base = str(bagel / "dcp"), str(bagel / "base")
    alias, plain = tmp_path / "alias", tmp_path / "plain"
    assert main(["bagel2hf", "--checkpoint_dir", src, "--output_dir", str(alias),
                 "--base_model_path", base, "--models", models]) == 0  # fmt: skip
    assert main(["convert", src, str(plain), "--base", base, "--models", models]) == 0
    assert tree(alias) == tree(plain)
    assert (alias / "ae.safetensors").exists() and (alias / "ema.safetensors").exists()
