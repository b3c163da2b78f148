"""Helper for test_distributed.py: a DMS search (or a recovery finetune) on a tiny model, run alone or under
`accelerate launch`.

    python tests/ddp_search.py OUT.json --batch-size 2 [--finetune]
    accelerate launch --multi_gpu --num_processes 2 tests/ddp_search.py OUT.json --batch-size 1 [--finetune]
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import per_layer_structure, tiny_llama  # noqa: E402

from dms_llm.search import PruneConfig, prune  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--batch-size", type=int, required=True, help="per process")
parser.add_argument("--finetune", action="store_true", help="recovery finetune of a pruned model instead")
parser.add_argument("--fsdp", action="store_true", help="shard the frozen weights (FSDP2) across the processes")
args = parser.parse_args()
torch.set_num_threads(1)
model = tiny_llama()
calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
if args.finetune:
    from accelerate import PartialState

    from dms_llm.exporter import build_pruned_model
    from dms_llm.recovery import FinetuneConfig, finetune

    pruned = build_pruned_model(model, per_layer_structure(model))
    config = FinetuneConfig(tokens=6 * 2 * 32, batch_size=args.batch_size, lr=1e-3)
    result = finetune(pruned, calib, config, teacher=model, progress=False)
    state = PartialState()
    if state.is_main_process:
        with open(args.out, "w") as f:
            json.dump({"processes": state.num_processes, "loss": [h["loss"] for h in result.history],
                       "grad_norm": [h["grad_norm"] for h in result.history],
                       "weights": {k: v.flatten().tolist() for k, v in pruned.state_dict().items()}}, f)
    sys.exit(0)
# sharded weights skip the checks after the search (they compare against the dense model): the single process
# skips them too under --fsdp, so that both return the search's own structure
checks = dict(format="per-layer", depth_check=0) if args.fsdp else {}
# fp32: one process and two reduce the same gradients in a different order, which bf16 rounding would magnify
cfg = PruneConfig(keep=0.6, steps=12, warmup_steps=2, batch_size=args.batch_size, seed=5, patience=100,
                  fsdp=args.fsdp, mixed_precision="no", **checks)
result = prune(model, calib, cfg, progress=False)
from accelerate import PartialState  # noqa: E402

state = PartialState()
if state.is_main_process:
    with open(args.out, "w") as f:
        from torch.distributed.tensor import DTensor

        sharded = any(isinstance(p, DTensor) for p in model.parameters())
        json.dump({"structure": result.structure.to_dict(), "processes": state.num_processes,
                   "sharded": sharded,
                   "hard": [h["hard_resource"] for h in result.history]}, f)
