"""torchrun script: start FSDP2 training from a DCP checkpoint that `ckptflow convert --to dcp`
wrote, as a user's trainer does (gloo, CPU).

    torchrun --nproc_per_node 2 fsdp_resume.py CONFIG_DIR DCP_DIR KEY OUT_JSON

Builds the model from CONFIG_DIR's config.json (random weights), shards it with `fully_shard`
(each layer, then the root), loads DCP_DIR into its sharded state dict with `dcp.load` (under
KEY, or flat when KEY is "-"), gathers the full state dict as loaded, then takes one AdamW
step. Rank 0 writes OUT_JSON: the loaded full state dict's file, the loss, and how far the
step moved the weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root


def main() -> None:
    from safetensors.torch import save_file
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dir, dcp_dir, key, out = sys.argv[1:5]
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    torch.manual_seed(1234)  # weights unlike the checkpoint's: only the load can make them equal
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    model.train()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)

    state = model.state_dict()
    dcp.load(state if key == "-" else {key: state}, checkpoint_id=dcp_dir)
    model.load_state_dict(state)  # what torchtitan and FSDP examples do after dcp.load

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if rank == 0:
        save_file({k: v.contiguous() for k, v in full.items()}, f"{out}.loaded.safetensors")

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(rank)
    )
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    after = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if rank == 0:
        moved = max(float((after[k].float() - full[k].float()).abs().max()) for k in full)
        Path(out).write_text(
            json.dumps({"loss": float(loss), "moved": moved, "names": sorted(full)})
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
