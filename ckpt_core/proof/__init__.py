"""Proof a user can run on any model directory: files against the manifest or the index, the
model's keys as a strict load sees them, tensors and logits against a reference checkpoint
(`verify_dir`), and a seeded generation run with timings (`run_test_model`)."""
