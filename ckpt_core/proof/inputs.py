"""A prompt as the model's own preprocessing makes it: the chat template when the tokenizer (or
processor) has one; for an image-text model, one small synthetic image through its processor."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ckpt_core.errors import ConfigError

__all__ = ["IMAGE_SIDE", "Prompting", "first_line", "synthetic_image"]

IMAGE_SIDE = 56  # pixels: Qwen2.5-VL's smallest image (min_pixels 56*56), 4 tokens after merge


def synthetic_image(seed: int, side: int = IMAGE_SIDE) -> np.ndarray:
    """An RGB image, the same for a seed: a gradient plus seeded noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, side, dtype=np.float64)
    image = (ramp[None, :, None] + ramp[:, None, None]) / 2 + rng.normal(0, 20, (side, side, 3))
    return np.asarray(np.clip(image, 0, 255), dtype=np.uint8)


class Prompting:
    """Turns prompts into `generate` inputs and new token ids back into text."""

    def __init__(self, path: str, config: Any, *, vision: bool, seed: int) -> None:
        import transformers

        self.path, self.vision, self.seed, self.config = path, vision, seed, config
        self.processor: Any = None
        self.image_processor: Any = None
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(
                f"{path}: no tokenizer transformers can load ({first_line(e)})"
            ) from e
        if vision:
            try:
                self.processor = transformers.AutoProcessor.from_pretrained(path)  # type: ignore[no-untyped-call]
            except (ImportError, ValueError, AttributeError, OSError, TypeError):
                # transformers' Qwen2-VL processors need torchvision for their video part: without
                # it, the image processor and the tokenizer do the processor's two steps.
                self.processor = None
            if self.processor is None or not hasattr(self.processor, "image_processor"):
                try:
                    self.image_processor = transformers.AutoImageProcessor.from_pretrained(path)  # type: ignore[no-untyped-call]
                except (ImportError, ValueError, OSError, TypeError) as e:
                    raise ConfigError(
                        f"{path}: an image-text model without an image processor transformers "
                        f"can load ({first_line(e)})"
                    ) from e

    def inputs(self, prompt: str) -> dict[str, torch.Tensor]:
        made = self._inputs(prompt)
        if made["input_ids"].numel() == 0:
            raise ConfigError(
                f"{self.path}: its tokenizer ({type(self.tokenizer).__name__}) turns the prompt "
                f"{prompt[:60]!r} into no tokens; check tokenizer_config.json's tokenizer_class"
            )
        return made

    def _inputs(self, prompt: str) -> dict[str, torch.Tensor]:
        if not self.vision:
            text = self._templated([{"role": "user", "content": prompt}], self.tokenizer)
            if text is None:
                return dict(self.tokenizer(prompt, return_tensors="pt"))
            return dict(self.tokenizer(text, return_tensors="pt", add_special_tokens=False))
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
        ]
        image = synthetic_image(self.seed)
        if self.processor is not None and self.image_processor is None:
            text = self._templated(messages, self.processor) or prompt
            return dict(self.processor(text=[text], images=[image], return_tensors="pt"))
        return self._image_and_text(messages, image, prompt)

    def _image_and_text(
        self, messages: list[dict[str, Any]], image: np.ndarray, prompt: str
    ) -> dict[str, torch.Tensor]:
        """The Qwen2-VL processors' rule: the image's one placeholder token repeated once per
        merged patch (grid t*h*w / merge_size^2)."""
        pixels = dict(self.image_processor(images=[image], return_tensors="pt"))
        grid = pixels.get("image_grid_thw")
        token_id = getattr(self.config, "image_token_id", None)
        if grid is None or token_id is None:
            raise ConfigError(
                "transformers cannot build this model's processor here (torchvision missing?) "
                "and its image inputs are not Qwen2-VL's (image_grid_thw, image_token_id)"
            )
        merge = int(getattr(self.image_processor, "merge_size", 2))
        count = int(grid[0].prod()) // merge**2
        token = str(self.tokenizer.convert_ids_to_tokens(int(token_id)))
        text = self._templated(messages, self.tokenizer)
        if text is None or token not in text:
            text = f"{token} {prompt}"
        text = text.replace(token, token * count, 1)
        ids = dict(self.tokenizer(text, return_tensors="pt", add_special_tokens=False))
        return {**ids, **pixels}

    def _templated(self, messages: list[dict[str, Any]], owner: Any) -> str | None:
        if not getattr(owner, "chat_template", None):
            return None
        return str(owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))

    def decode(self, ids: torch.Tensor) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    @property
    def pad_token_id(self) -> int | None:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else self.tokenizer.eos_token_id


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
