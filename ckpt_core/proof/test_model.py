"""`ckptflow test-model`, and the post-training flow's test step: load a model directory
strictly, generate greedily from seeded prompts, measure, and return a JSON-ready dict.

What the script it replaces did not: it fails (VerifyError, one line) when the model does not
load, has missing or unexpected keys, or generation fails; the same model, prompts and seed give
the same text on every run; `device="auto"` picks CUDA when present, else the CPU.
"""

from __future__ import annotations

import hashlib
import platform
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

import ckpt_core
from ckpt_core.errors import CkptError, ConfigError, UsageError, VerifyError, clip
from ckpt_core.families.model_config import CONFIG, read_config
from ckpt_core.formats.protocol import OpenOptions
from ckpt_core.formats.registry import get_format
from ckpt_core.io.storage import Location
from ckpt_core.pipeline.manifest import MANIFEST
from ckpt_core.proof.compare import target_dtype
from ckpt_core.proof.inputs import Prompting, first_line
from ckpt_core.proof.memory import peak_device_bytes, peak_host_bytes, reset_peaks
from ckpt_core.proof.quiet import quiet_transformers
from ckpt_core.proof.strict_load import auto_class

__all__ = [
    "DEFAULT_PROMPTS",
    "LoadDtype",
    "TestDevice",
    "markdown",
    "pick_device",
    "run_test_model",
]

TestDevice = Literal["auto", "cpu", "cuda"]
LoadDtype = Literal["auto", "bf16", "fp16", "fp32"]
DEFAULT_PROMPTS = (
    "Hello, who are you?",
    "Explain in one sentence what a checkpoint is.",
    "Write a haiku about the sea.",
)
_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}


def pick_device(device: TestDevice) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device here; use --device cpu or auto")
    return device


def run_test_model(
    model_url: str,
    *,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    max_new_tokens: int = 32,
    device: TestDevice = "auto",
    dtype: LoadDtype = "auto",
    seed: int = 0,
    benchmark_samples: int = 0,
) -> dict[str, Any]:
    """Load, generate each prompt once (and `benchmark_samples` more times to time it), and
    return the settings, versions, load time and per-prompt/aggregated figures."""
    import transformers

    root = Location(model_url)
    if not root.is_local:
        raise UsageError(f"{model_url}: test-model loads with transformers: needs a local path")
    if not prompts:
        raise UsageError("test-model: no prompts given")
    config = read_config(root)
    if config is None:
        raise ConfigError(f"{root.file(CONFIG)}: missing: not a model directory")
    architecture = next(iter(config.get("architectures") or []), "")
    model_class = getattr(transformers, architecture, None) if architecture else None
    if model_class is None:
        raise ConfigError(
            f"{root.file(CONFIG)}: architectures {config.get('architectures')!r} names no "
            "transformers model class"
        )
    on = pick_device(device)
    reset_peaks(on)
    started = time.perf_counter()
    model = _load(model_class, root, dtype, on)
    load_seconds = time.perf_counter() - started
    load_peaks = {"peak_host_bytes": peak_host_bytes(), "peak_device_bytes": peak_device_bytes(on)}
    vision = auto_class(architecture) == "AutoModelForImageTextToText"
    prompting = Prompting(root.path, model.config, vision=vision, seed=seed)
    results = [
        _prompt(model, prompting, text, on, max_new_tokens, seed, benchmark_samples)
        for text in prompts
    ]
    return {
        "model": model_url,
        "architecture": architecture,
        "auto_class": auto_class(architecture),
        "image_input": vision,
        "device": on,
        "device_name": torch.cuda.get_device_name()
        if on == "cuda"
        else platform.processor() or platform.machine(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "benchmark_samples": benchmark_samples,
        "manifest_sha256": _manifest_sha256(root),
        "versions": _versions(),
        "load_seconds": round(load_seconds, 4),
        "load": load_peaks,
        "prompts": results,
        "aggregate": _aggregate(results),
    }


def _saved_dtype(root: Location) -> torch.dtype | str:
    """The weights' own floating-point dtype (config.json's `dtype` may say another: a bf16
    conversion of an fp32 model keeps the source's config), else transformers' "auto"."""
    try:
        index = get_format("hf").open(root, OpenOptions()).index()
    except CkptError:
        return "auto"  # from_pretrained says what is wrong
    return target_dtype(index, None) or "auto"


def _load(model_class: Any, root: Location, dtype: LoadDtype, device: str) -> Any:
    """from_pretrained, strictly: missing, unexpected or wrongly shaped keys fail (in one
    line: transformers' own multi-line load report is kept quiet, the error says it all)."""
    path = root.path
    load_dtype = _saved_dtype(root) if dtype == "auto" else _DTYPES[dtype]
    try:
        with quiet_transformers():
            model, info = model_class.from_pretrained(
                path, dtype=load_dtype, output_loading_info=True
            )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise VerifyError(f"{path}: does not load with transformers: {first_line(e)}") from e
    problems = [
        f"{kind.replace('_', ' ')} {len(names)}: {clip([str(n) for n in names], 5)}"
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
        if (names := list(info.get(kind) or []))
    ]
    if problems:
        raise VerifyError(
            f"{path}: does not load strictly as {model_class.__name__} ({'; '.join(problems)}); "
            "run `ckptflow verify` on it"
        )
    return model.to(device).eval()


@dataclass(frozen=True)
class _Run:
    text: str
    token_ids: list[int]
    new_tokens: int
    generate_seconds: float
    ttft_seconds: float
    peak_host_bytes: int
    peak_device_bytes: int | None


class _Clock:
    """A `generate` streamer that only takes times: the first `put` is the prompt, the
    second the first new token."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_token: float | None = None
        self._puts = 0

    def put(self, value: torch.Tensor) -> None:
        self._puts += 1
        if self._puts == 2 and self.first_token is None:
            self.first_token = time.perf_counter()

    def end(self) -> None:
        pass


def _prompt(
    model: Any,
    prompting: Prompting,
    prompt: str,
    device: str,
    max_new_tokens: int,
    seed: int,
    samples: int,
) -> dict[str, Any]:
    inputs = {k: v.to(device) for k, v in prompting.inputs(prompt).items()}
    prompt_tokens = int(inputs["input_ids"].shape[-1])
    runs = []
    for _ in range(1 + samples):
        torch.manual_seed(seed)  # greedy needs none; a model's own sampling hooks might
        reset_peaks(device)
        clock = _Clock()
        try:
            with torch.no_grad():
                out = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    streamer=clock,
                    pad_token_id=prompting.pad_token_id,
                )
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            raise VerifyError(
                f"generation failed on prompt {prompt[:60]!r}: {first_line(e)}"
            ) from e
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - clock.started
        new = out[0, prompt_tokens:]
        runs.append(
            _Run(
                text=prompting.decode(new),
                token_ids=[int(i) for i in new],
                new_tokens=int(new.numel()),
                generate_seconds=seconds,
                ttft_seconds=(clock.first_token or time.perf_counter()) - clock.started,
                peak_host_bytes=peak_host_bytes(),
                peak_device_bytes=peak_device_bytes(device),
            )
        )
    first = runs[0]
    timed = runs[1:] or runs  # with --benchmark, the samples after the first (warm) run
    seconds = statistics.median(r.generate_seconds for r in timed)
    result: dict[str, Any] = {
        "prompt": prompt,
        "prompt_tokens": prompt_tokens,
        "text": first.text,
        "token_ids": first.token_ids,
        "new_tokens": first.new_tokens,
        "ttft_seconds": round(statistics.median(r.ttft_seconds for r in timed), 5),
        "generate_seconds": round(seconds, 5),
        "tokens_per_second": round(first.new_tokens / seconds, 2) if seconds else None,
        "peak_host_bytes": max(r.peak_host_bytes for r in runs),
        "peak_device_bytes": _max_or_none(r.peak_device_bytes for r in runs),
    }
    if samples:
        result["samples"] = len(timed)
        result["generate_seconds_all"] = [round(r.generate_seconds, 5) for r in timed]
        result["same_text_every_sample"] = all(r.token_ids == first.token_ids for r in runs)
    return result


def _aggregate(results: list[dict[str, Any]]) -> dict[str, Any]:
    tokens = sum(r["new_tokens"] for r in results)
    seconds = sum(r["generate_seconds"] for r in results)
    return {
        "prompts": len(results),
        "new_tokens": tokens,
        "generate_seconds": round(seconds, 5),
        "tokens_per_second": round(tokens / seconds, 2) if seconds else None,
        "ttft_seconds_mean": round(statistics.fmean(r["ttft_seconds"] for r in results), 5),
        "peak_host_bytes": max(r["peak_host_bytes"] for r in results),
        "peak_device_bytes": _max_or_none(r["peak_device_bytes"] for r in results),
    }


def _max_or_none(values: Iterable[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _manifest_sha256(root: Location) -> str | None:
    """The sha256 of the directory's manifest.json: which conversion this model is."""
    if not root.exists(MANIFEST):
        return None
    return hashlib.sha256(root.read_bytes(MANIFEST)).hexdigest()


def _versions() -> dict[str, str]:
    import tokenizers
    import transformers

    return {
        "ckptflow": ckpt_core.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "cuda": str(torch.version.cuda),
    }


def markdown(result: dict[str, Any]) -> str:
    """`run_test_model`'s result as a short markdown report (a flow's artifact)."""
    total = result["aggregate"]
    lines = [
        f"**{result['model']}** ({result['architecture']}, {result['dtype']} on "
        f"{result['device']}): loaded in {result['load_seconds']} s; {total['new_tokens']} new "
        f"tokens at {total['tokens_per_second']} tokens/s",
        "",
        "| prompt | text | new tokens | ttft s | tokens/s | peak host MiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for p in result["prompts"]:
        text = p["text"].replace("|", "\\|").replace("\n", " ")[:80]
        lines.append(
            f"| {p['prompt'][:40]} | {text} | {p['new_tokens']} | {p['ttft_seconds']} | "
            f"{p['tokens_per_second']} | {p['peak_host_bytes'] / 2**20:.0f} |"
        )
    return "\n".join(lines)
