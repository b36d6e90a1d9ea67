"""The key gathering of CoFT+'s queue across ranks (gloo, two CPU processes)."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from coft_fast.models.momentum import MomentumContrast
from coft_fast.runtime.distributed import all_gather_rows, world_size


def test_one_process_gathers_its_own_rows():
    rows = torch.randn(3, 4)
    assert world_size() == 1 and all_gather_rows(rows) is rows


def _rank_main(rank, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same queue and key encoder on both ranks, as DDP would have
        contrast = MomentumContrast(nn.Linear(3, 4), 4, queue_size=8, momentum=0.5, gather=all_gather_rows)
        keys = torch.full((2, 4), float(rank + 1))
        contrast.push_(keys)
        results[rank] = (contrast.queue.clone(), int(contrast.ptr))
    finally:
        dist.destroy_process_group()


def test_each_rank_queues_the_keys_of_every_rank(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
        results = dict(results)
    (queue0, ptr0), (queue1, ptr1) = results[0], results[1]
    assert ptr0 == ptr1 == 4
    torch.testing.assert_close(queue0, queue1)
    torch.testing.assert_close(queue0[:4], torch.tensor([[1.0] * 4] * 2 + [[2.0] * 4] * 2))
