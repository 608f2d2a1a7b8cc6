"""`verify --logits`: the output and the reference, each loaded as the model its config
describes, run on one fixed input; their logits compared. This one holds both models in RAM
(fine for the small models it is meant for; the tensor comparison is the streamed proof)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ckpt_core.dtypes import output_dtype
from ckpt_core.errors import UsageError
from ckpt_core.families import FAMILIES
from ckpt_core.families.model_config import transformers_config
from ckpt_core.formats.protocol import Reader
from ckpt_core.io.storage import Location
from ckpt_core.proof.compare import Tolerance
from ckpt_core.proof.quiet import quiet_transformers
from ckpt_core.proof.report import Failure

__all__ = ["LogitsCheck", "compare_logits", "fixed_inputs"]


@dataclass(frozen=True)
class LogitsCheck:
    failures: list[Failure]
    max_abs_diff: float
    detail: str


def fixed_inputs(config: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """The family's demo batch (a VLM's: image patches and text) when ckptflow has rules for
    the model, else two rows of token ids drawn from a seeded generator."""
    family = FAMILIES.get(str(getattr(config, "model_type", "")))
    if family is not None:
        batch = dict(family.demo_batch(config, seed))
        batch.pop("labels", None)
        return batch
    vocab = int(config.get_text_config().vocab_size)
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (2, 12), generator=generator)}


def compare_logits(
    out_url: str,
    ref: Reader,
    *,
    config: Mapping[str, Any],
    config_at: str,
    architecture: str,
    target: torch.dtype | None,
    tolerance: Tolerance,
    seed: int = 0,
) -> LogitsCheck:
    import transformers

    root = Location(out_url)
    if not root.is_local:
        raise UsageError(
            f"{out_url}: --logits loads the model with transformers: needs a local path"
        )
    model_class = getattr(transformers, architecture)
    hf_config = transformers_config(config, config_at)
    dtype = target or torch.float32
    state = {n: ref.read(n).to(output_dtype(i.dtype, target)) for n, i in ref.index().items()}
    with quiet_transformers():
        ours = model_class.from_pretrained(root.path, dtype=dtype)
        theirs, info = model_class.from_pretrained(
            None, config=hf_config, state_dict=state, dtype=dtype, output_loading_info=True
        )
    del state
    failures = [
        Failure("logits", "", name, f"the reference has no {name}: its model loads it random")
        for name in sorted(info.get("missing_keys", []))
    ]
    batch = fixed_inputs(hf_config, seed)
    with torch.no_grad():
        a = ours.eval()(**batch).logits.to(torch.float64)
        b = theirs.eval()(**batch).logits.to(torch.float64)
    worst = float((a - b).abs().max())
    within = torch.allclose(a, b, rtol=tolerance.rtol, atol=tolerance.atol, equal_nan=True)
    if not (torch.equal(a, b) if tolerance.exact else within):
        differ = f"logits differ on the fixed input (max |diff| {worst:.6g}, {list(a.shape)})"
        failures.append(Failure("logits", "", "", differ))
    on = f"{str(dtype).removeprefix('torch.')}, fixed input {list(a.shape)}"
    detail = f"{architecture} in {on}: max |diff| {worst:.6g}"
    return LogitsCheck(failures, worst, detail)
