"""Value and reward models that transformers has no class for: a causal LM backbone whose output
head is a one-output linear layer, as the RLHF trainers save them. Sequence- and
token-classification models (`score.*`, what trl's reward trainer and verl's critic write) need
no rule: transformers builds them from `architectures` itself.

Each rule is data: which `architectures` names it, the head's module path, whether it has a bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["RULES", "ValueHeadRule", "build_value_head_model", "value_head_rule"]


@dataclass(frozen=True)
class ValueHeadRule:
    architectures: tuple[str, ...]  # names in config.json's `architectures` (suffix match)
    head: str  # module path of the Linear(hidden_size, 1) that replaces `lm_head`
    bias: bool


RULES = (
    # trl's AutoModelForCausalLMWithValueHead (trl < 1.0): the LM's own keys plus v_head.summary
    ValueHeadRule(("ForCausalLMWithValueHead",), "v_head.summary", bias=True),
    # OpenRLHF's reward and critic models: `model.*` plus value_head (no bias)
    ValueHeadRule(("RewardModel", "CriticModel"), "value_head", bias=False),
)


def value_head_rule(architecture: str | None) -> ValueHeadRule | None:
    if not architecture:
        return None
    return next((r for r in RULES if architecture.endswith(r.architectures)), None)


def build_value_head_model(config: Any, rule: ValueHeadRule) -> Any:
    """The causal LM the config describes with its `lm_head` replaced by the rule's value head,
    on the meta device; the LM's tie rule no longer applies (there is no output embedding)."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
        model.lm_head = torch.nn.Identity()
        parent: torch.nn.Module = model
        *path, leaf = rule.head.split(".")
        for part in path:
            child = torch.nn.Module()
            parent.add_module(part, child)
            parent = child
        parent.add_module(leaf, torch.nn.Linear(config.hidden_size, 1, bias=rule.bias))
    return model
