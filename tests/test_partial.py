"""`--exclude-frozen` is a partial output: the verdict and the manifest say so (with what was
left out), and the output indeed lacks exactly those tensors; the rest is DeepSpeed's truth."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_core.pipeline.conversion import options_from
from ckpt_core.pipeline.convert import ConvertOptions, convert
from tests.helpers.deepspeed_truth import FROZEN, ckpt, reference

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("case", ["stage1", "stage3"])
def test_exclude_frozen_is_a_partial_output(ds_root: Path, case: str, tmp_path: Path) -> None:
    from transformers import Qwen2ForCausalLM

    path, out = ckpt(ds_root, case), tmp_path / "hf"
    base = str(ds_root / case / "base")
    result = convert(path, str(out), options_from(dtype="fp32", base=base, exclude_frozen=True))
    assert result.report is not None
    verdict = result.report.rows()[0]
    assert verdict == {
        "item": "verdict",
        "value": "PARTIAL: frozen parameters left out (1 tensors); not loadable as the model "
        "on its own; the rest identical to the source",
    }
    summary = json.loads((out / "manifest.json").read_text())["report"]
    assert summary["partial"] is True
    assert summary["left_out"] == 1 and summary["left_out_names"] == [FROZEN]

    loaded: Any = Qwen2ForCausalLM.from_pretrained(str(out), output_loading_info=True)
    model, info = loaded
    assert set(info["missing_keys"]) == {FROZEN} and not info["unexpected_keys"], info
    state = model.state_dict()
    for name, value in reference(path, exclude_frozen=True).items():
        assert torch.equal(state[name], value), name


def test_a_full_conversion_is_not_partial(ds_root: Path, tmp_path: Path) -> None:
    path, out = ckpt(ds_root, "stage2"), tmp_path / "hf"
    result = convert(
        path, str(out), ConvertOptions(dtype="fp32", base=str(ds_root / "stage2" / "base"))
    )
    assert result.report is not None
    assert result.report.rows()[0]["value"] == "OK: identical to the source"
    summary = json.loads((out / "manifest.json").read_text())["report"]
    assert summary["partial"] is False and "left_out" not in summary
