"""Two DeepSpeed data-parallel workers on gloo: identical parameters, equal to one process on the global batch."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from student.config import OptimConfig
from student.engine import LocalEngine

STEPS = 4
GLOBAL_BATCH = 8


def _model():
    torch.manual_seed(0)
    # no batch norm: its per-rank statistics would (rightly) differ from one full-batch process
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 1, 3, padding=1))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(STEPS, GLOBAL_BATCH, 3, 8, 16, generator=g), torch.rand(STEPS, GLOBAL_BATCH, 1, 8, 16, generator=g)


def _loss(model, x, y):
    return (model(x) - y).abs().mean()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, stage, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from cluster.deepspeed_engine import DeepSpeedEngine

    eng = DeepSpeedEngine(_model(), OptimConfig(lr=1e-2, grad_clip=0.5), torch.device("cpu"), zero_stage=stage,
                          micro_batch=GLOBAL_BATCH // world)
    xs, ys = _data()
    half = GLOBAL_BATCH // world
    for s in range(STEPS):
        x, y = xs[s, rank * half:(rank + 1) * half], ys[s, rank * half:(rank + 1) * half]
        loss = _loss(eng.module, x, y)
        assert eng.all_finite(loss)
        eng.backward_and_step(loss)
    torch.save({k: v.detach().clone() for k, v in eng.model_state().items()}, f"{out}/rank{rank}.pt")
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("stage", [0, 2])
def test_two_gloo_workers_match_each_other_and_one_process(tmp_path, stage):
    mp.spawn(_worker, args=(2, _free_port(), stage, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k} differs between ranks"
    ref = LocalEngine(_model(), OptimConfig(lr=1e-2, grad_clip=0.5), torch.device("cpu"))
    xs, ys = _data()
    for s in range(STEPS):
        ref.backward_and_step(_loss(ref.module, xs[s], ys[s]))
    init = _model().state_dict()
    for k, v in ref.module.state_dict().items():
        # tolerance: fp32 all-reduce sums in another order than one process; 1e-5 relative to the step made
        moved = (v - init[k]).abs().max().item()
        assert moved > 1e-4  # training did move the weights
        assert torch.allclose(r0[k], v, atol=1e-5 * max(1.0, moved) + 1e-6), f"{k}: {(r0[k] - v).abs().max()}"


def test_a_killed_builds_lock_is_cleared_and_a_live_one_kept(tmp_path):
    import os
    import time

    from cluster.deepspeed_engine import clear_stale_build_locks

    old, new = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (old, new):
        lock.parent.mkdir()
        lock.touch()
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert clear_stale_build_locks(tmp_path, max_age_s=900) == [old]
    assert not old.exists() and new.exists()
    assert clear_stale_build_locks(tmp_path / "missing") == []
