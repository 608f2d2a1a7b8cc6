"""The Megatron fixtures' paths and their truth: Megatron's own forward logits, recorded at save
time, against the converted HF model's on the same input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.fixtures.megatron_cache import megatron_fixtures
from tests.fixtures.megatron_gen import HF_VOCAB, SEQ


@pytest.fixture(scope="session")
def mg_root() -> Path:
    return megatron_fixtures()


def input_ids() -> torch.Tensor:
    """The input the generator ran Megatron's forward on."""
    return (torch.arange(SEQ) * 37 + 11).remainder(HF_VOCAB).unsqueeze(0)


def hf_logits(model_dir: Path) -> torch.Tensor:
    """Fp32 logits of the converted model, loaded strictly: every tensor the model has is in
    the files, nothing more, every shape right."""
    from transformers import AutoModelForCausalLM

    loaded: Any = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, output_loading_info=True
    )
    model, info = loaded
    assert not any(info.values()), info  # missing, unexpected, mismatched, error messages
    with torch.no_grad():
        logits = model.eval()(input_ids()).logits
    assert isinstance(logits, torch.Tensor)
    return logits


def reference(case_dir: Path) -> torch.Tensor:
    logits = torch.load(case_dir / "logits.pt", weights_only=True)
    assert isinstance(logits, torch.Tensor)
    return logits
