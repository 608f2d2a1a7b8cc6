"""DeepSpeed ZeRO 1/2/3: ckptflow's reader against DeepSpeed's own zero_to_fp32, on real files.

The fixtures are written by DeepSpeed under torchrun (tests/fixtures/gen_deepspeed.py) and
cached per generator hash. The truth is `get_fp32_state_dict_from_zero_checkpoint`, except
where that tool is pinned below as losing information (stage 1 frozen params, buffer dtype).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_core.errors import FormatError, UnsafeFileError
from ckpt_core.formats.deepspeed import DeepSpeedFormat
from ckpt_core.formats.protocol import OpenOptions, Reader
from ckpt_core.formats.registry import detect, open_reader
from ckpt_core.io.storage import Location
from ckpt_core.pipeline.convert import ConvertOptions, convert
from tests.fixtures.deepspeed_cache import CASES, REPO, overrides_for
from tests.fixtures.tiny import build_tiny_qwen2
from tests.helpers.deepspeed_truth import FROZEN, ckpt, reference

pytestmark = pytest.mark.slow

ALL_CASES = [case for cases in CASES.values() for case in cases]


def stage_of(case: str) -> int:
    return int(case[len("stage")])


def frozen_truth(case: str) -> torch.Tensor:
    """The frozen norm never trains: it is the initial weight, cast to bf16 by DeepSpeed."""
    model = build_tiny_qwen2(
        seed=stage_of(case), tie_word_embeddings="_tied" in case, **overrides_for(case)
    )
    return model.model.norm.weight.detach().to(torch.bfloat16)


@pytest.mark.parametrize("case", ALL_CASES)
def test_matches_zero_to_fp32_bit_for_bit(ds_root: Path, case: str) -> None:
    path = ckpt(ds_root, case)
    reader = open_reader(path)
    ref = reference(path)
    index = reader.index()
    if stage_of(case) == 1:
        # Pinned: stage 1 saves no frozen_param_shapes, so zero_to_fp32 drops frozen params
        # (a model loaded from its output has a missing key); ckptflow takes them from the
        # 16-bit module copy.
        assert FROZEN not in ref
        assert set(index) == set(ref) | {FROZEN}
    else:
        assert set(index) == set(ref)
    buffers = {"model.ckptflow_scale", "model.ckptflow_steps"} if "_buffers" in case else set()
    assert buffers <= set(index)
    for name, info in index.items():
        tensor = reader.read(name)
        assert tensor.dtype == info.dtype and tuple(tensor.shape) == info.shape, name
        assert tensor.is_contiguous()
        if name == FROZEN:
            assert info.dtype == torch.bfloat16  # not an fp32 master: it has none
            assert torch.equal(tensor, frozen_truth(case))
        elif name in buffers:
            # Pinned: zero_to_fp32 upcasts float buffers to fp32; ckptflow keeps the stored
            # dtype (the cast is the writer's job); the values agree exactly.
            assert info.dtype == (torch.bfloat16 if name.endswith("scale") else torch.int64)
            assert torch.equal(tensor.to(ref[name].dtype), ref[name])
            continue
        else:
            assert info.dtype == torch.float32, name
        if name in ref:
            assert tensor.dtype == ref[name].dtype, name
            assert torch.equal(tensor, ref[name]), name


@pytest.mark.parametrize("case", ["stage1", "stage2", "stage3", "stage3_tied"])
def test_index_is_in_model_order(ds_root: Path, case: str) -> None:
    index = open_reader(ckpt(ds_root, case)).index()
    model = build_tiny_qwen2(tie_word_embeddings="_tied" in case)
    assert list(index) == [name for name in model.state_dict() if name in index]
    if "_tied" in case:
        assert index["lm_head.weight"] == index["model.embed_tokens.weight"].__class__(
            "lm_head.weight", torch.float32, (320, 64)
        )


def test_fixtures_exercise_padding(ds_root: Path) -> None:
    """The 3-rank fixtures must really have padded params, or the tests above prove little."""
    from ckpt_core.formats.deepspeed_layout import DEEPSPEED_GLOBALS
    from ckpt_core.formats.torchzip import LazyTorchFile

    def optim(case: str) -> Any:
        tag = ds_root / case / "ckpt" / "global_step2"
        name = "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
        return LazyTorchFile(Location(str(tag)), name, extra_globals=DEEPSPEED_GLOBALS).obj[
            "optimizer_state_dict"
        ]

    for case in ("stage1_aligned_ws3", "stage2_aligned_ws3"):
        assert any(any(group) for group in optim(case)["param_alignment_paddings"]), case
    shapes = open_reader(ckpt(ds_root, "stage3_ws3")).index()
    assert any(info.numel % 3 for info in shapes.values())


def test_parallel_reads_agree(ds_root: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    reader = open_reader(ckpt(ds_root, "stage3_ws3"))
    names = list(reader.index())
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(reader.read, names))
    for name, tensor in zip(names, parallel, strict=True):
        assert torch.equal(tensor, reader.read(name)), name


@pytest.mark.parametrize("case", ["stage1", "stage2", "stage3", "stage3_ws3"])
def test_exclude_frozen(ds_root: Path, case: str) -> None:
    path = ckpt(ds_root, case)
    reader = open_reader(path, OpenOptions(exclude_frozen=True))
    assert FROZEN not in reader.index()
    assert set(reader.index()) == set(reference(path, exclude_frozen=True))
    assert any("exclude_frozen" in note for note in reader.facts().notes)


@pytest.mark.parametrize("case", ["stage2", "stage3_tied"])
def test_reads_only_each_params_slice(
    ds_root: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every tensor costs exactly its own bytes: no flat group is ever read whole."""
    reader = open_reader(ckpt(ds_root, case))
    sizes: list[int] = []
    original = Location.read_into

    def recording(self: Location, relative: str, start: int, buffer: memoryview) -> None:
        sizes.append(buffer.nbytes)
        original(self, relative, start, buffer)

    monkeypatch.setattr(Location, "read_into", recording)
    for name, info in reader.index().items():
        sizes.clear()
        reader.read(name)
        assert sum(sizes) == info.nbytes, name


def copy_ckpt(ds_root: Path, case: str, tmp_path: Path) -> tuple[Path, Path]:
    dest = tmp_path / case
    shutil.copytree(ds_root / case / "ckpt", dest)
    return dest, dest / (dest / "latest").read_text().strip()


@pytest.mark.parametrize("case", ["stage2", "stage3"])
def test_stale_extra_partition_is_an_error(ds_root: Path, case: str, tmp_path: Path) -> None:
    root, tag = copy_ckpt(ds_root, case, tmp_path)
    stale = "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt"
    shutil.copy(tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", tag / stale)
    with pytest.raises(FormatError, match=stale):
        open_reader(str(root))


@pytest.mark.parametrize("case", ["stage2", "stage3"])
def test_missing_partition_is_an_error(ds_root: Path, case: str, tmp_path: Path) -> None:
    root, tag = copy_ckpt(ds_root, case, tmp_path)
    (tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(FormatError, match=r"missing for data-parallel ranks 1 of 2"):
        open_reader(str(root))


def test_missing_stage3_model_states_is_an_error(ds_root: Path, tmp_path: Path) -> None:
    root, tag = copy_ckpt(ds_root, "stage3", tmp_path)
    (tag / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(FormatError, match="model states files missing"):
        open_reader(str(root))


class _Marker:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize(
    "victim",
    ["bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"],
)
def test_malicious_partition_is_refused(ds_root: Path, tmp_path: Path, victim: str) -> None:
    root, tag = copy_ckpt(ds_root, "stage3", tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": {"zero_stage": _Marker(marker)}}, tag / victim)
    with pytest.raises(UnsafeFileError, match=victim):
        reader = open_reader(str(root))
        for name in reader.index():
            reader.read(name)
    assert not marker.exists()


def test_tags_and_detection(ds_root: Path) -> None:
    path = ckpt(ds_root, "stage3")
    assert detect(path).name == "deepspeed"
    fmt = DeepSpeedFormat()
    assert not fmt.detect(Location(str(ds_root / "stage3" / "base")))
    tag_dir = str(Path(path) / "global_step2")
    assert fmt.detect(Location(tag_dir))
    expected = open_reader(path).read("lm_head.weight")
    for reader in (
        open_reader(path, OpenOptions(tag="global_step2")),
        open_reader(tag_dir),
        open_reader(tag_dir, OpenOptions(tag="global_step2")),
    ):
        assert torch.equal(reader.read("lm_head.weight"), expected)


def test_unknown_or_escaping_tag_is_refused(ds_root: Path) -> None:
    path = ckpt(ds_root, "stage3")
    with pytest.raises(FormatError, match="global_step9"):
        open_reader(path, OpenOptions(tag="global_step9"))
    with pytest.raises(FormatError, match="outside"):
        open_reader(path, OpenOptions(tag="../stage2"))


def test_two_tags_without_latest_need_a_tag(ds_root: Path, tmp_path: Path) -> None:
    # Two tags and no `latest`: refuse to guess.
    root, tag = copy_ckpt(ds_root, "stage3", tmp_path)
    shutil.copytree(tag, root / "global_step1")
    (root / "latest").unlink()
    with pytest.raises(FormatError, match="--tag"):
        open_reader(str(root))
    assert open_reader(str(root), OpenOptions(tag="global_step1")).index()


def test_facts_and_assets(ds_root: Path) -> None:
    reader: Reader = open_reader(ckpt(ds_root, "stage3_tied"))
    facts = reader.facts()
    assert facts.format == "deepspeed"
    assert "global_step2/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt" in facts.files
    assert any("stage 3" in note and "global_step2" in note for note in facts.notes)
    dirs = [Path(d.path) for d in reader.asset_dirs()]
    assert ds_root / "stage3_tied" / "ckpt" in dirs and ds_root / "stage3_tied" in dirs


def test_reader_never_imports_deepspeed(ds_root: Path) -> None:
    script = (
        "import sys\n"
        "from ckpt_core.formats.registry import open_reader\n"
        "for case in ('stage1', 'stage2', 'stage3_tied'):\n"
        f"    r = open_reader({str(ds_root)!r} + '/' + case + '/ckpt')\n"
        "    [r.read(n) for n in r.index()]\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed')\n"
        "assert not bad, bad\n"
        "print('clean')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "clean" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize(
    "case", ["stage1", "stage2", "stage3", "stage3_tied", "stage2_aligned_ws3", "stage3_ws3"]
)
def test_convert_end_to_end(ds_root: Path, case: str, tmp_path: Path) -> None:
    from transformers import Qwen2ForCausalLM

    path = ckpt(ds_root, case)
    out = tmp_path / "hf"
    options = ConvertOptions(dtype="fp32", base=str(ds_root / case / "base"))
    convert(path, str(out), options)
    loaded: Any = Qwen2ForCausalLM.from_pretrained(str(out), output_loading_info=True)
    model, info = loaded
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ref = reference(path)
    state = model.state_dict()
    for name, value in ref.items():
        assert torch.equal(state[name], value), name
    # Stage 1's frozen norm, which zero_to_fp32 loses, is there and right.
    assert torch.equal(state[FROZEN], frozen_truth(case).float())


@pytest.mark.parametrize("case", ["stage1_aligned_ws3", "stage2_aligned_ws3", "stage3_ws3"])
def test_read_range_streams_any_chunk(ds_root: Path, case: str) -> None:
    """Chunks that straddle rank partitions and padding rebuild each tensor exactly."""
    reader = open_reader(ckpt(ds_root, case))
    for name, info in reader.index().items():
        whole = reader.read(name).reshape(-1)
        for chunk in (7, 1000):
            parts = [
                reader.read_range(name, start, min(chunk, info.numel - start))  # type: ignore[attr-defined]
                for start in range(0, info.numel, chunk)
            ]
            assert torch.equal(torch.cat(parts), whole), (name, chunk)
