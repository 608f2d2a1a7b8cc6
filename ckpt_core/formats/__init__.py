"""Reading checkpoints: the Reader protocol, one module per on-disk format, the registry table
that lists them, and the one allow-listed unpickler every pickle goes through."""
