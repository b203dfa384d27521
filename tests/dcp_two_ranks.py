"""Write a DCP checkpoint from two processes, each holding half of every tensor (a DTensor
sharded on dim 0, as FSDP shards parameters). Used by test_scale.py.

    python tests/dcp_two_ranks.py OUT_DIR PORT
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

FULL = {"layer.weight": torch.arange(24.0).reshape(6, 4), "layer.bias": torch.arange(6.0), "other": torch.ones(5, 3)}

def worker(rank: int, world: int, folder: str, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    state = {"model": {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in FULL.items()}, "step": 11}
    dcp.save(state, checkpoint_id=folder)
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(worker, args=(2, sys.argv[1], int(sys.argv[2])), nprocs=2)
