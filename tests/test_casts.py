"""No silent damage in casts: a finite source value that the output dtype cannot hold fails the
conversion naming the tensor (nothing published) unless --allow-overflow; values that were
inf or nan in the source are copied as they are."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2ForCausalLM

from ckpt_core.errors import CastOverflowError
from ckpt_core.formats.protocol import TensorInfo
from ckpt_core.pipeline import convert as core
from ckpt_core.pipeline.casts import check_cast, narrows_range
from ckpt_core.pipeline.conversion import options_from
from ckpt_core.pipeline.stream import ChunkBuffers, source_chunks
from ckpt_core.pipeline.verify import identical
from ckptflow.cli import main

NAME = "model.layers.0.mlp.up_proj.weight"


def test_narrowing_casts() -> None:
    assert narrows_range(torch.float32, torch.float16)
    assert narrows_range(torch.float32, torch.bfloat16)  # just below fp32's max
    assert narrows_range(torch.bfloat16, torch.float16)
    assert narrows_range(torch.float64, torch.float32)
    assert not narrows_range(torch.float16, torch.bfloat16)
    assert not narrows_range(torch.float16, torch.float32)
    assert not narrows_range(torch.int64, torch.float16)


def test_check_cast_tells_overflow_from_source_inf_and_nan() -> None:
    inf, nan = float("inf"), float("nan")
    already = torch.tensor([1.0, inf, -inf, nan, 65504.0])
    check_cast("t", already, already.half())  # non-finite in the source: a faithful copy
    check_cast("t", already, already.bfloat16())
    source = torch.tensor([1.0, 7e4, -1e6, nan])
    with pytest.raises(CastOverflowError) as caught:
        check_cast("layer.w", source, source.half())
    message = str(caught.value)
    assert message.startswith("layer.w: 2 finite value(s) overflow float16 (largest |x| = 1e+06")
    assert "--dtype bf16 or keep" in message and "--allow-overflow" in message
    near_max = torch.tensor([3.4e38])  # finite in fp32, beyond bf16's max
    with pytest.raises(CastOverflowError, match=r"overflow bfloat16 .*--dtype fp32 or keep"):
        check_cast("layer.w", near_max, near_max.bfloat16())


class _Flat:
    """A reader of one tensor, with or without ranged reads."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def read(self, name: str) -> torch.Tensor:
        return self.tensor

    def read_range(
        self, name: str, start: int, count: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        piece = self.tensor.reshape(-1)[start : start + count]
        return piece if out is None else out.copy_(piece)


@pytest.mark.parametrize("buffers", [None, ChunkBuffers()])
def test_source_chunks_checks_every_chunk_when_asked(buffers: ChunkBuffers | None) -> None:
    tensor = torch.zeros(1000)
    tensor[777] = 1e5  # in the last of several chunks
    info = TensorInfo("w", torch.float32, (1000,))
    reader = _Flat(tensor)
    chunks = source_chunks(reader, info, torch.float16, 400, buffers)  # type: ignore[arg-type]
    assert torch.isinf(torch.cat([c.clone() for c in chunks])).sum() == 1  # unchecked: inf
    with pytest.raises(CastOverflowError, match=r"^w: 1 finite value"):
        for _ in source_chunks(reader, info, torch.float16, 400, buffers, check_overflow=True):  # type: ignore[arg-type]
            pass


def _source(tiny_hf_dir: Path, tmp_path: Path, **values: float) -> Path:
    """A copy of the tiny model with values put into NAME (fp32)."""
    src = tmp_path / "src"
    shutil.copytree(tiny_hf_dir, src)
    state = load_file(src / "model.safetensors")
    for position, value in enumerate(values.values()):
        state[NAME].view(-1)[position] = value
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src


def _loaded(path: Path) -> dict[str, torch.Tensor]:
    model, info = Qwen2ForCausalLM.from_pretrained(
        path, dtype=torch.float16, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return dict(model.state_dict())


def test_overflow_to_fp16_fails_naming_the_tensor_and_publishes_nothing(
    tiny_hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _source(tiny_hf_dir, tmp_path, big=7e4, small=-2e5)
    dst = tmp_path / "dst"
    assert main(["convert", str(src), str(dst), "--dtype", "fp16"]) == 2
    err = capsys.readouterr().err  # the progress bar, then the error
    lines = [line for line in err.splitlines() if line.startswith("ckptflow:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"ckptflow: error: {NAME}: 2 finite value(s) overflow float16")
    assert "largest |x| = 200000" in lines[0] and "--dtype bf16" in lines[0]
    assert "--allow-overflow" in lines[0] and "nothing was published" in lines[0]
    assert not dst.exists() and not list(tmp_path.glob(".dst*"))

    # The error leaves write_shard itself, before anything is published.
    plan = core.plan_conversion(str(src), str(dst), options_from(dtype="fp16"))
    core.start(plan)
    with pytest.raises(CastOverflowError, match=NAME):
        for number in range(len(plan.shards)):
            core.write_shard(plan, number)
    assert not dst.exists()

    # bf16 holds these values: the default converts them.
    assert main(["convert", str(src), str(tmp_path / "bf16")]) == 0


def test_allow_overflow_writes_inf_and_says_it_is_the_cast(
    tiny_hf_dir: Path, tmp_path: Path
) -> None:
    src = _source(tiny_hf_dir, tmp_path, big=7e4)
    dst = tmp_path / "dst"
    assert main(["convert", str(src), str(dst), "--dtype", "fp16", "--allow-overflow"]) == 0
    truth = load_file(src / "model.safetensors")
    loaded = _loaded(dst)
    assert loaded[NAME].view(-1)[0] == float("inf")
    for name, tensor in truth.items():
        assert identical(loaded[name], tensor.half()), name


def test_source_inf_and_nan_are_copied_not_refused(tiny_hf_dir: Path, tmp_path: Path) -> None:
    src = _source(tiny_hf_dir, tmp_path, a=float("inf"), b=float("-inf"), c=float("nan"))
    result = core.convert(str(src), str(tmp_path / "dst"), options_from(dtype="fp16"))
    assert result.report is not None and result.report.ok
    truth = load_file(src / "model.safetensors")
    loaded = _loaded(tmp_path / "dst")
    for name, tensor in truth.items():
        assert identical(loaded[name], tensor.half()), name
