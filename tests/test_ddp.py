"""Data-parallel ODE-Net training: 2 CPU processes (gloo, localhost) keep identical replicas."""

import argparse
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    from pyneuralode.repro import odenet_mnist

    opts = argparse.Namespace(
        quick=True,
        epochs=None,
        device="cpu",
        out=out,
        seed=0,
        no_progress=True,
        data="synthetic",
        max_batches=3,
        solver="bs3",
        tol=1e-2,
        replica_dump=out,
    )
    m = odenet_mnist.run(opts)  # ends with destroy_process_group
    torch.save(m, os.path.join(out, f"metrics{rank}.pt"))
    # Leave without the interpreter's teardown, once the results are written: in one clean-clone
    # CI run a rank died with SIGABRT ("terminate called without an active exception", a joinable
    # std::thread destroyed: gloo's) and 25 runs alone did not reproduce it; the teardown after the
    # process group is destroyed is where such threads go. What this test checks is the replicas.
    os._exit(0)


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)
def test_two_cpu_replicas_stay_identical(tmp_path):
    out = str(tmp_path)
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    s0, s1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    i0 = torch.load(tmp_path / "rank0_init.pt")
    m0, m1 = torch.load(tmp_path / "metrics0.pt"), torch.load(tmp_path / "metrics1.pt")
    assert m0["world_size"] == 2 and m0["steps"] == 3
    # both ranks evaluate their half of the test set and all-reduce: same numbers everywhere
    assert m0["test_accuracy"] == m1["test_accuracy"]
    moved = 0.0
    for k in s0:
        torch.testing.assert_close(s0[k], s1[k], rtol=0, atol=1e-6, msg=f"replicas differ in {k}")
        moved = max(moved, float((s0[k].float() - i0[k].float()).abs().max()))
    assert moved > 1e-4  # training moved the parameters
    assert (tmp_path / "metrics.json").is_file()  # written by rank 0 only


def test_without_allreduce_replicas_would_differ(tmp_path):
    """Control for the test above: the two ranks' data shards give different gradients."""
    from torch.utils.data import DistributedSampler

    idx = [
        list(iter(DistributedSampler(range(384), num_replicas=2, rank=r, shuffle=True, seed=0)))
        for r in (0, 1)
    ]
    assert set(idx[0]).isdisjoint(idx[1]) and len(idx[0]) == len(idx[1]) == 192
