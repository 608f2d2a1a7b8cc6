"""`ckptflow test-model`: a strict load, seeded greedy generation (the same text and tokens on
every run, and the very tokens transformers' own greedy search gives for the model in memory),
the JSON with timings, memory, versions and the manifest's sha256; a missing weight fails in
one line; a tiny Qwen2.5-VL gets a synthetic image through its image processor."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpt_core.pipeline.conversion import options_from
from ckpt_core.pipeline.convert import convert
from ckpt_core.proof.test_model import markdown
from ckptflow.cli import main
from tests.fixtures.tiny_vlm import build_tiny_vlm
from tests.helpers.tiny_text import write_image_processor, write_tokenizer

PROMPT = "Hello there"


@pytest.fixture(scope="module")
def lm_out(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2 with a tokenizer, converted by ckptflow (fp32: the same weights)."""
    src = tmp_path_factory.mktemp("lm") / "src"
    shutil.copytree(tiny_hf_dir, src)
    write_tokenizer(src)
    out = src.parent / "out"
    convert(str(src), str(out), options_from(dtype="fp32"))
    return out


def _run(args: list[str], out_file: Path) -> dict[str, Any]:
    assert main(["test-model", *args, "--output-file", str(out_file)]) == 0
    result: dict[str, Any] = json.loads(out_file.read_text())
    return result


def test_two_runs_write_the_same_text_and_the_models_own_greedy_tokens(
    lm_out: Path, tmp_path: Path, tiny_model: Any
) -> None:
    args = [str(lm_out), "--prompt", PROMPT, "--max-new-tokens", "6", "--device", "auto"]
    first = _run(args, tmp_path / "a.json")
    second = _run(args, tmp_path / "b.json")
    assert [p["token_ids"] for p in first["prompts"]] == [p["token_ids"] for p in second["prompts"]]
    assert [p["text"] for p in first["prompts"]] == [p["text"] for p in second["prompts"]]

    # The tokens are those of the model trained (in memory), through its chat template.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(lm_out))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        expected = tiny_model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=1)
    got = first["prompts"][0]
    assert got["token_ids"] == expected[0, ids["input_ids"].shape[1] :].tolist()
    assert got["prompt_tokens"] == ids["input_ids"].shape[1]
    assert got["text"] == tokenizer.decode(got["token_ids"], skip_special_tokens=True)

    assert first["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert first["architecture"] == "Qwen2ForCausalLM"
    sha = hashlib.sha256((lm_out / "manifest.json").read_bytes()).hexdigest()
    assert first["manifest_sha256"] == sha
    assert set(first["versions"]) >= {"ckptflow", "torch", "transformers", "tokenizers"}
    assert first["load_seconds"] > 0
    assert got["new_tokens"] == 6 and got["tokens_per_second"] > 0
    assert 0 < got["ttft_seconds"] <= got["generate_seconds"]
    assert got["peak_host_bytes"] > 0
    assert first["aggregate"]["new_tokens"] == 6
    assert PROMPT in markdown(first) and "| 6 |" in markdown(first)


def test_the_old_scripts_spellings_and_benchmark_samples(lm_out: Path, tmp_path: Path) -> None:
    result = _run(
        [
            "--model_path", str(lm_out), "--test_prompts", "One", "Two",
            "--benchmark_samples", "2", "--max_new_tokens", "3", "--device", "cpu",
        ],
        tmp_path / "old.json",
    )  # fmt: skip
    assert [p["prompt"] for p in result["prompts"]] == ["One", "Two"]
    assert all(p["samples"] == 2 and p["same_text_every_sample"] for p in result["prompts"])
    assert result["aggregate"]["prompts"] == 2 and result["aggregate"]["new_tokens"] == 6


def test_a_missing_weight_fails_in_one_line(
    lm_out: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(lm_out, broken)
    (broken / "manifest.json").unlink()
    (broken / "_SUCCESS").unlink()
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    out_file = tmp_path / "never.json"
    code = main(["test-model", str(broken), "--output-file", str(out_file), "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ckptflow: error: ")
    assert "model.layers.1.mlp.up_proj.weight" in err[0] and "missing" in err[0]
    assert not out_file.exists()


def test_a_tokenizer_that_makes_no_tokens_fails_in_one_line(
    lm_out: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A word-level tokenizer.json that transformers loads as the model type's tokenizer class
    (Qwen2Tokenizer) tokenizes every prompt to nothing: said, not a generation traceback."""
    from tests.fixtures.tiny_vlm import write_tokenizer as write_word_level

    odd = tmp_path / "odd"
    shutil.copytree(lm_out, odd)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (odd / name).unlink(missing_ok=True)
    write_word_level(odd, 320)
    assert main(["test-model", str(odd), "--prompt", "w5 w7", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "into no tokens" in err[0]


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vlm")
    build_tiny_vlm(seed=0).save_pretrained(str(path))
    write_tokenizer(path)
    write_image_processor(path)
    return path


def test_a_tiny_qwen2_5_vl_sees_a_synthetic_image_and_repeats_itself(
    vlm_dir: Path, tmp_path: Path
) -> None:
    args = [str(vlm_dir), "--prompt", "Describe it.", "--max-new-tokens", "5", "--device", "cpu"]
    first = _run(args, tmp_path / "a.json")
    second = _run(args, tmp_path / "b.json")
    assert first["image_input"] and first["auto_class"] == "AutoModelForImageTextToText"
    assert first["prompts"][0]["token_ids"] == second["prompts"][0]["token_ids"]
    assert first["prompts"][0]["text"] == second["prompts"][0]["text"]
    # "<user> " + vision start, 4 image tokens (56x56 pixels, 14-pixel patches, 2x2 merge),
    # vision end + the prompt + " <assistant> ", one token per byte.
    text_bytes = len("<user> ") + len("Describe it.") + len(" <assistant> ")
    assert first["prompts"][0]["prompt_tokens"] == text_bytes + 1 + 4 + 1
    assert first["prompts"][0]["new_tokens"] == 5
