"""One module per on-disk format; each calls `ckpt_core.registry.register` on import."""
