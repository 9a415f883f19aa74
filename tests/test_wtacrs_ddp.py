"""WTA-CRS under data parallelism on CPU: 2 processes (gloo, localhost), DDP and FSDP2.

Each rank sees different data and draws its own samples; DDP's all-reduce must leave both ranks
with the same (averaged) weight gradients, and the loss must go down. FSDP2 (``fully_shard``) is
tried the same way; where this torch/gloo build cannot run it the test is skipped with the reason.
"""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    from torch import nn
    from layerpress.nn import WTACRSLinear
    torch.manual_seed(0)  # same initial weights on every rank
    return nn.Sequential(WTACRSLinear(32, 64, ratio=0.3, min_k=4), nn.GELU(),
                         WTACRSLinear(64, 64, ratio=0.3, min_k=4), nn.GELU(), nn.Linear(64, 4))


def _data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(16, 8, 32, generator=g)
    w = torch.randn(32, 4, generator=torch.Generator().manual_seed(7))  # same target map everywhere
    return x, (x @ w).tanh()


def _train(model, rank, steps=12):
    import torch.distributed as dist
    x, y = _data(rank)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses, synced = [], True
    torch.manual_seed(1000 + rank)  # each rank draws different samples
    for step in range(steps):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        if step == 0:
            for p in model.parameters():
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                gs = [torch.empty_like(g) for _ in range(2)]
                dist.all_gather(gs, g.contiguous())
                synced &= torch.equal(gs[0], gs[1])
        opt.step()
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(t.item() / 2)
    # after training, the (full) parameters must be identical on both ranks
    for p in model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        ps = [torch.empty_like(full) for _ in range(2)]
        dist.all_gather(ps, full.detach().contiguous())
        synced &= torch.equal(ps[0], ps[1])
    return losses, synced


def _worker(rank, port, out_dir):
    import torch.distributed as dist
    import layerpress  # noqa: F401  (registers the ops in the child)
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    res = {}
    try:
        losses, synced = _train(DDP(_model()), rank)
        res["ddp"] = {"losses": losses, "synced": synced}
        try:
            from torch.distributed.fsdp import fully_shard
            model = _model()
            for m in model:
                if isinstance(m, torch.nn.Linear):
                    fully_shard(m)
            fully_shard(model)
            losses, synced = _train(model, rank)
            res["fsdp2"] = {"losses": losses, "synced": synced}
        except Exception as e:  # noqa: BLE001  (reported, not hidden: the test skips with it)
            res["fsdp2"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
        dist.barrier()  # nobody tears gloo down while the other rank still talks to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]


def test_ddp_gradients_synchronised_and_loss_decreases(results):
    for r in results:
        assert r["ddp"]["synced"], "DDP left different gradients or parameters on the two ranks"
    losses = results[0]["ddp"]["losses"]
    assert losses == results[1]["ddp"]["losses"]
    assert losses[-1] < 0.7 * losses[0], losses


def test_fsdp2(results):
    r0 = results[0]["fsdp2"]
    if "error" in r0:
        pytest.skip(f"FSDP2 on CPU/gloo not available here: {r0['error']}")
    for r in results:
        assert r["fsdp2"]["synced"]
    losses = r0["losses"]
    assert losses[-1] < 0.7 * losses[0], losses
