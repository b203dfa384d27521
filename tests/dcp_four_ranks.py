"""Write a DCP checkpoint from four processes with uneven chunks: a 10-row tensor sharded
over 4 ranks (3, 3, 3, 1 rows), a 2-row one (two ranks hold nothing), a tensor sharded on
both dims of a 2x2 mesh, a replicated one; beside them nested dicts and non-tensor
entries. Used by test_dcp_scale.py.

    python tests/dcp_four_ranks.py OUT_DIR PORT
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

FULL = {"rows": torch.arange(70.0).reshape(10, 7), "pair": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "grid": torch.arange(5 * 9, dtype=torch.float16).reshape(5, 9), "bias": torch.linspace(-1, 1, 13)}
EXTRAS = {"step": 11, "config": {"name": "tiny", "lrs": [0.1, 0.01], "nested": {"depth": 3}}}


def worker(rank: int, world: int, folder: str, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    line, grid = init_device_mesh("cpu", (world,)), init_device_mesh("cpu", (2, 2))
    model = {"rows": distribute_tensor(FULL["rows"], line, [Shard(0)]),
             "pair": distribute_tensor(FULL["pair"], line, [Shard(0)]),
             "grid": distribute_tensor(FULL["grid"], grid, [Shard(0), Shard(1)]),
             "bias": distribute_tensor(FULL["bias"], line, [Replicate()])}
    state = {"model": model, "optim": {"moments": {"rows": distribute_tensor(FULL["rows"] * 2, line, [Shard(0)])}},
             **EXTRAS}
    dcp.save(state, checkpoint_id=folder)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(4, sys.argv[1], int(sys.argv[2])), nprocs=4)
