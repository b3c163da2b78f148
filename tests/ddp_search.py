"""Helper for test_distributed.py: a DMS search on a tiny model, run alone or under `accelerate launch`.

    python tests/ddp_search.py OUT.json --batch-size 2
    accelerate launch --cpu --num_processes 2 tests/ddp_search.py OUT.json --batch-size 1
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_llama  # noqa: E402

from dms_llm.search import PruneConfig, prune  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--batch-size", type=int, required=True, help="per process")
args = parser.parse_args()
torch.set_num_threads(1)
model = tiny_llama()
calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
cfg = PruneConfig(keep=0.6, steps=12, warmup_steps=2, batch_size=args.batch_size, seed=5, patience=100)
result = prune(model, calib, cfg, progress=False)
from accelerate import PartialState  # noqa: E402

state = PartialState()
if state.is_main_process:
    ratios = {k: v for k, v in result.config.items() if k == "batch_size"}
    with open(args.out, "w") as f:
        json.dump({"structure": result.structure.to_dict(), "processes": state.num_processes, **ratios,
                   "hard": [h["hard_resource"] for h in result.history]}, f)
