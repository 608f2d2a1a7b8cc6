"""BAGEL-style step directories (main + EMA, written by real `dcp.save` / FSDP1 sharded saves)
converted into a release directory that mirrors the base model: each model's output equals its
own source after the bf16 cast, the VAE and configs are the base's, the tensor listing is the
base's own, and the base is never touched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckpt_core.errors import FormatError, KeyMismatchError, PublishError, UsageError
from ckpt_core.families.bagel import conv_to_linear, linear_to_conv
from ckpt_core.formats.registry import detect
from ckpt_core.pipeline.conversion import options_from
from ckpt_core.pipeline.convert import convert
from ckptflow.cli import main as cli_main
from tests.fixtures.bagel_cache import build_bagel_fixtures
from tests.fixtures.gen_bagel import PATCH_NAME, base_form
from tests.helpers.cli_runs import tree

CONFIGS = (
    "config.json",
    "llm_config.json",
    "vit_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "generation_config.json",
)


@pytest.fixture(scope="module")
def bagel() -> Path:
    """The cached step directories (dcp/, ranks/), base/ and the fp32 truth (gen_bagel.py)."""
    return build_bagel_fixtures()


def _listing(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) of a safetensors file or of an index's shards."""
    index = path.parent / f"{path.name}.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else [path.name]
    )
    found: dict[str, tuple[str, list[int]]] = {}
    for file in files:
        with safe_open(str(path.parent / file), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118  (safe_open is not a mapping)
                piece = handle.get_slice(name)
                found[name] = (piece.get_dtype(), list(piece.get_shape()))
    return found


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path.parent / f"{path.name}.index.json"
    if not index.exists():
        return load_file(str(path))
    out: dict[str, torch.Tensor] = {}
    for file in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        out |= load_file(str(path.parent / file))
    return out


def _expected(fixtures: Path, model: str) -> dict[str, torch.Tensor]:
    """The model's training weights as the base stores them: bf16, Conv2d patch embedding."""
    return base_form(load_file(str(fixtures / f"{model}.safetensors")))


def _assert_is(out: Path, stem: str, fixtures: Path, model: str) -> None:
    written, expected = _tensors(out / f"{stem}.safetensors"), _expected(fixtures, model)
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name
    assert _listing(out / f"{stem}.safetensors") == _listing(fixtures / "base" / "ema.safetensors")


def _copy_base(fixtures: Path, tmp: Path) -> Path:
    base = tmp / "base"
    shutil.copytree(fixtures / "base", base)
    return base


def test_detected_as_bagel_with_trainer_state_ignored(bagel: Path) -> None:
    assert detect(str(bagel / "dcp")).name == "bagel"
    assert detect(str(bagel / "ranks")).name == "bagel"


def test_both_models_mirror_the_base(bagel: Path, tmp_path: Path) -> None:
    base = bagel / "base"
    before = tree(base)
    out = tmp_path / "release"
    code = cli_main(
        ["convert", str(bagel / "dcp"), str(out), "--base", str(base), "--models", "both"]
    )
    assert code == 0
    _assert_is(out, "model", bagel, "main")
    _assert_is(out, "ema", bagel, "ema")
    main_out, ema_out = _tensors(out / "model.safetensors"), _tensors(out / "ema.safetensors")
    # The EMA output is the EMA weights: it differs from the main model in every tensor.
    assert all(not torch.equal(main_out[n], ema_out[n]) for n in main_out)
    for name in (*CONFIGS, "ae.safetensors"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert not (out / "pytorch_model.bin").exists()  # a base weight file is never copied
    assert not list(out.glob("*.index.json"))  # one file per model: no index
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {name: entry["sha256"] for name, entry in manifest["files"].items()}
    on_disk = tree(out)
    assert set(listed) == set(on_disk) - {"manifest.json", "_SUCCESS"}
    assert all(on_disk[n] == h for n, h in listed.items())
    assert manifest["source"]["format"] == "bagel"
    notes = " ".join(manifest["source"]["notes"])
    assert "optimizer_rank00000.pt" in notes and "scheduler.pt" in notes
    assert "qk_norm present" in notes
    assert tree(base) == before  # the base is byte-identical afterwards


@pytest.mark.parametrize("model", ["main", "ema"])
def test_one_model(bagel: Path, tmp_path: Path, model: str) -> None:
    out = tmp_path / model
    options = options_from(base=str(bagel / "base"), models=model)
    result = convert(str(bagel / "dcp"), str(out), options)
    assert result.report is not None and result.report.verdict.startswith("OK")
    stem = "model" if model == "main" else "ema"
    other = "ema" if model == "main" else "model"
    _assert_is(out, stem, bagel, model)
    assert not list(out.glob(f"{other}*.safetensors*"))
    assert (out / "ae.safetensors").exists()


def test_sharded_output_has_an_index_per_model(bagel: Path, tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    options = options_from(base=str(bagel / "base"), max_shard_size="8KB")
    convert(str(bagel / "dcp"), str(out), options)
    for stem, model in (("model", "main"), ("ema", "ema")):
        index = json.loads((out / f"{stem}.safetensors.index.json").read_text())
        files = set(index["weight_map"].values())
        assert len(files) > 1 and all(f.startswith(f"{stem}-") for f in files)
        assert not (out / f"{stem}.safetensors").exists()
        _assert_is(out, stem, bagel, model)


def test_per_rank_fallback(bagel: Path, tmp_path: Path) -> None:
    """FSDP1 SHARDED_STATE_DICT rank files (ShardedTensors) merge to the same two models."""
    out = tmp_path / "from-ranks"
    convert(str(bagel / "ranks"), str(out), options_from(base=str(bagel / "base")))
    _assert_is(out, "model", bagel, "main")
    _assert_is(out, "ema", bagel, "ema")


def test_ema_refused_without_ema_weights(bagel: Path, tmp_path: Path) -> None:
    step = tmp_path / "step"
    shutil.copytree(bagel / "dcp", step, ignore=shutil.ignore_patterns("ema_sharded"))
    meta = json.loads((step / "metadata.json").read_text())
    (step / "metadata.json").write_text(json.dumps({**meta, "has_ema": False}))
    base = str(bagel / "base")
    with pytest.raises(UsageError, match="--models ema: this checkpoint holds no ema weights"):
        convert(str(step), str(tmp_path / "o1"), options_from(base=base, models="ema"))
    convert(str(step), str(tmp_path / "o2"), options_from(base=base, models="both"))
    assert not (tmp_path / "o2" / "ema.safetensors").exists()
    _assert_is(tmp_path / "o2", "model", bagel, "main")
    # An ordinary (one-model) source: `ema` refused, `main` the normal conversion.
    plain = tmp_path / "plain"
    plain.mkdir()
    save_file({"w": torch.ones(2, 2)}, str(plain / "model.safetensors"))
    with pytest.raises(UsageError, match="holds one model and no EMA weights"):
        convert(str(plain), str(tmp_path / "o3"), options_from(models="ema"))
    convert(str(plain), str(tmp_path / "o4"), options_from(models="main"))
    assert load_file(str(tmp_path / "o4" / "model.safetensors"))["w"].dtype == torch.bfloat16


def test_checkpoint_that_is_not_the_base_model_is_refused(bagel: Path, tmp_path: Path) -> None:
    base = _copy_base(bagel, tmp_path)
    weights = load_file(str(base / "ema.safetensors"))
    name = "connector.fc2.weight"
    save_file(
        {**weights, name: torch.zeros(16, 8, dtype=torch.bfloat16)}, str(base / "ema.safetensors")
    )
    options = options_from(base=str(base))
    with pytest.raises(KeyMismatchError, match=r"shapes differ.*connector\.fc2\.weight \[16, 16\]"):
        convert(str(bagel / "dcp"), str(tmp_path / "o1"), options)
    without_qk = {n: t for n, t in weights.items() if "_norm" not in n or "self_attn" not in n}
    save_file(without_qk, str(base / "ema.safetensors"))
    with pytest.raises(KeyMismatchError, match="has qk_norm weights .* has none"):
        convert(str(bagel / "dcp"), str(tmp_path / "o2"), options)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_destination_inside_the_base_is_refused(bagel: Path, tmp_path: Path) -> None:
    base = _copy_base(bagel, tmp_path)
    before = tree(base)
    for dst in (base, base / "converted", tmp_path):
        with pytest.raises(PublishError, match="overlaps the base model"):
            convert(str(bagel / "dcp"), str(dst), options_from(base=str(base)))
    assert tree(base) == before


def test_patch_embedding_forms_compute_the_same() -> None:
    """The family rule: Linear over patches flattened (kh, kw, C) == Conv2d with stride = kernel."""
    generator = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, kernel_size=4, stride=4, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(5, 3, 4, 4, generator=generator))
    image = torch.randn(1, 3, 8, 8, generator=generator)
    patches = image.reshape(1, 3, 2, 4, 2, 4).permute(0, 2, 4, 3, 5, 1).reshape(4, 48)
    linear = conv_to_linear(conv.weight.detach())
    assert linear.shape == (5, 48)
    expected = conv(image).permute(0, 2, 3, 1).reshape(4, 5)
    torch.testing.assert_close(patches @ linear.T, expected)
    assert torch.equal(linear_to_conv(linear, (5, 3, 4, 4)), conv.weight.detach())


def test_patch_embedding_back_to_linear(bagel: Path, tmp_path: Path) -> None:
    """A checkpoint holding the Conv2d form, a base storing the Linear form: Linear is written."""
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    trained = load_file(str(bagel / "main.safetensors"))
    linear = trained[PATCH_NAME]
    step = tmp_path / "step"
    step.mkdir()
    as_conv = {**trained, PATCH_NAME: linear_to_conv(linear, (24, 3, 4, 4))}
    dcp_save(as_conv, checkpoint_id=str(step / "model_sharded"))  # one process, no group
    meta = {"checkpoint_type": "sharded", "world_size": 1, "has_ema": False}
    (step / "metadata.json").write_text(json.dumps(meta))
    base = _copy_base(bagel, tmp_path)
    weights = load_file(str(base / "ema.safetensors"))
    weights[PATCH_NAME] = conv_to_linear(weights[PATCH_NAME])
    save_file(weights, str(base / "ema.safetensors"))
    out = tmp_path / "linear"
    convert(str(step), str(out), options_from(base=str(base), models="main"))
    written = load_file(str(out / "model.safetensors"))
    assert written[PATCH_NAME].shape == (24, 48)
    assert torch.equal(written[PATCH_NAME], linear.to(torch.bfloat16))
    assert _listing(out / "model.safetensors") == _listing(base / "ema.safetensors")


def test_missing_ema_rank_file_is_named(bagel: Path, tmp_path: Path) -> None:
    step = tmp_path / "step"
    shutil.copytree(bagel / "ranks", step)
    (step / "ema_rank00001.pt").unlink()
    with pytest.raises(
        FormatError, match=r"missing rank file\(s\) ema_rank00001\.pt of world size 2"
    ):
        convert(str(step), str(tmp_path / "out"), options_from(base=str(bagel / "base")))


def test_sharded_tensor_fragment_allows_only_its_one_getattr() -> None:
    """FSDP1 pickles call getattr(ShardedTensor, "ProcessGroupState"); nothing else passes."""
    from ckpt_core.formats.unpickle import SHARDED_TENSOR, restricted_load

    escape = b"c__builtin__\ngetattr\n(c__builtin__\ngetattr\nS'__globals__'\ntR."
    with pytest.raises(FormatError, match="refused getattr"):
        restricted_load(escape, "evil.pt", SHARDED_TENSOR)
