"""Muon: foreach momentum without per-step allocation, and Parallel Muon (Newton-Schulz split
across ranks, updates all-gathered) giving the single-process optimizer's updates at world sizes
1, 2 and 3 over gloo (3 ranks: uneven shares, one rank with nothing to do in a small bank)."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt as tg

# Banks of 1, 2, 3 and 5 same-shape matrices (tall, wide and square): every share pattern.
SHAPES = [(8, 16)] * 5 + [(16, 8)] * 3 + [(12, 12)] * 2 + [(6, 10)]
STEPS = 3


def make_params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in SHAPES]


def grads_at(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(shape, generator=gen) for shape in SHAPES]


def run_muon(rank: int = 0, world_size: int = 1) -> list[torch.Tensor]:
    params = make_params()
    opt = tg.Muon(params, 0.05, 0.9, 5, 0.1, True, rank=rank, world_size=world_size)
    for step in range(STEPS):
        for p, g in zip(params, grads_at(step), strict=True):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.save(run_muon(rank, world_size), f"{out}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_muon_allocates_momentum_once_and_matches_the_reference_update():
    params = [torch.nn.Parameter(torch.ones(4, 4))]
    opt = tg.Muon(params, lr=0.1, momentum=0.5, ns_steps=5, weight_decay=0.0, row_normalize=False)
    params[0].grad = torch.full((4, 4), 2.0)
    opt.step()
    buf = opt.state[params[0]]["momentum_buffer"]
    params[0].grad = torch.full((4, 4), 2.0)
    opt.step()
    assert opt.state[params[0]]["momentum_buffer"] is buf  # updated in place, not re-allocated
    torch.testing.assert_close(buf, torch.full((4, 4), 3.0))  # 0.5 * 2 + 2


def test_muon_step_does_not_allocate_zero_buffers_after_the_first(monkeypatch):
    params = make_params()
    opt = tg.Muon(params, 0.05, 0.9, 5, 0.1, True)
    for p, g in zip(params, grads_at(0), strict=True):
        p.grad = g
    opt.step()
    calls = []
    monkeypatch.setattr(torch, "zeros_like", lambda *a, **k: calls.append(1) or pytest.fail("zeros_like"))
    opt.step()
    assert calls == []


def test_share_covers_each_bank_once_with_uneven_splits():
    for n in range(1, 12):
        for world in (1, 2, 3, 8):
            spans = [
                tg.Muon([torch.nn.Parameter(torch.ones(2, 2))], 0.1, 0.9, 5, 0, True, r, world).share(n)
                for r in range(world)
            ]
            covered = [i for start, stop, _ in spans for i in range(start, stop)]
            assert covered == list(range(n))
            assert all(stop - start <= size for start, stop, size in spans)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_parallel_muon_matches_the_single_process_optimizer(world_size, tmp_path):
    torch.set_num_threads(1)
    reference = run_muon()
    mp.spawn(_rank_main, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size, join=True)
    for rank in range(world_size):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for i, (a, b) in enumerate(zip(got, reference, strict=True)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"rank {rank} matrix {i}")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
