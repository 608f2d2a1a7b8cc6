"""Offline tokenizers and processors for the tiny models (no hub download): a byte-level
Qwen2 tokenizer (every byte one token, no merges; eos `</s>` at id 1, the vision tokens at the
tiny Qwen2.5-VL config's ids 2-5) with a chat template, and a Qwen2-VL image processor."""

from __future__ import annotations

from pathlib import Path

# Enough of a chat template: the user's text, an image placeholder where the message has an
# image, then an assistant marker.
CHAT_TEMPLATE = (
    "{% for m in messages %}<user> {% if m.content is string %}{{ m.content }}"
    "{% else %}{% for c in m.content %}{% if c.type == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c.text }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %} <assistant> {% endif %}"
)
SPECIAL = {
    "</s>": 1,
    "<|vision_start|>": 2,
    "<|vision_end|>": 3,
    "<|image_pad|>": 4,
    "<|video_pad|>": 5,
}
FIRST_BYTE_ID = 10


def write_tokenizer(directory: Path) -> None:
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode().values()  # type: ignore[no-untyped-call]
    vocab = {c: FIRST_BYTE_ID + i for i, c in enumerate(byte_chars)}
    vocab.update(SPECIAL)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,  # type: ignore[arg-type]  # byte-level: every text has tokens
        eos_token="</s>",
        pad_token="</s>",
        extra_special_tokens=[t for t in SPECIAL if t != "</s>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(directory))


def write_image_processor(directory: Path) -> None:
    from transformers import Qwen2VLImageProcessorPil

    # 56x56 pixels: 4x4 patches of 14, 4 tokens after the 2x2 merge.
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56 * 4).save_pretrained(
        str(directory)
    )
