"""ckpt_core: detect, read lazily, stream, cast, verify and publish checkpoints. No Prefect here."""

__version__ = "0.1.0"
