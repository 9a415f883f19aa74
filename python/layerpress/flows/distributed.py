"""Calibration across processes with ``torch.distributed`` (``torchrun --nproc-per-node N``).

The quantisation flows call these helpers at the few points where ranks must agree; without an
initialised default process group (or with one rank) every helper is the identity, so a single
process runs exactly the code it ran before.

* calibration batches are dealt to the ranks whole (:func:`local_batches`: batch ``j`` goes to
  rank ``j % world``), so each rank runs the same per-batch arithmetic as one process would;
* the statistics collected from them are summed over the ranks (:func:`all_reduce_sum`): GPTQ
  Hessians (fp64 running sums of fp32 per-batch products), AWQ activation statistics and output
  errors, LIM cosines, AdaDim axis errors;
* per block, the linears are dealt to the ranks (:func:`compute_by_owner`), each quantised by its
  owner only, and the results broadcast so every rank swaps in the same ``QuantLinear``;
* :func:`check_ranks_agree` refuses a run whose ranks differ in settings or calibration data.

Exactness: one process sums a Hessian batch by batch; here each rank sums its own batches and the
ranks' sums are added. In fp64 the two orders agree to about 1e-16 relative (exactly whenever a
sum of the fp32 terms is representable, which is the common case), so the fp32 Hessian GPTQ reads
and hence the codes are the same except where a value lies within that rounding of a
quantisation boundary.
"""
from __future__ import annotations

import hashlib
import json
from typing import Callable, Dict, List, Sequence

import torch

__all__ = ["world_size", "rank", "local_batches", "all_reduce_sum", "compute_by_owner",
           "check_ranks_agree", "RanksDisagree"]


class RanksDisagree(ValueError):
    """The ranks of a distributed run were given different settings or calibration data."""


def _active() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if _active() else 0


def _comm_device(t: torch.Tensor) -> torch.device:
    """Where a collective on ``t`` runs: NCCL needs CUDA tensors, gloo takes CPU ones."""
    import torch.distributed as dist
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_batches(input_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """This rank's calibration sequences: the batches ``j`` of ``batch_size`` sequences with
    ``j % world == rank`` (all of them in one process), concatenated in order, so that splitting
    the result by ``batch_size`` again gives exactly those batches. Refuses fewer batches than
    ranks (a rank without data would contribute nothing and stall nothing, but is a mistake)."""
    n_w = world_size()
    if n_w == 1:
        return input_ids
    batches = list(input_ids.split(batch_size))
    if len(batches) < n_w:
        raise ValueError(f"distributed calibration: {len(batches)} batches of {batch_size} "
                         f"sequences for {n_w} ranks; use more calibration sequences or a "
                         "smaller batch_size")
    return torch.cat(batches[rank()::n_w])


def all_reduce_sum(*values):
    """Sums each value over the ranks: tensors (returned as new tensors on their own device and
    dtype) and Python numbers (summed in fp64 / int64). One value in, one out; several, a
    tuple."""
    if not _active():
        return values[0] if len(values) == 1 else values
    import torch.distributed as dist
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            t = v.detach().to(_comm_device(v)).clone()
            dist.all_reduce(t)
            out.append(t.to(v.device))
        else:
            dt = torch.int64 if isinstance(v, int) and not isinstance(v, bool) else torch.float64
            t = torch.tensor([v], dtype=dt, device=_comm_device(torch.empty(0)))
            dist.all_reduce(t)
            out.append(t.item())
    return out[0] if len(out) == 1 else tuple(out)


def compute_by_owner(keys: Sequence[str], compute: Callable[[str], object],
                     device=None) -> Dict[str, object]:
    """``{key: compute(key)}``, with the work dealt to the ranks: key ``i`` is computed by rank
    ``i % world`` and its result (any object ``torch.save`` takes, e.g. a ``QuantResult``)
    broadcast to all, its tensors landing on ``device`` (default CPU). Every rank gets every
    result, in the order of ``keys``."""
    if not _active():
        return {k: compute(k) for k in keys}
    import io

    import torch.distributed as dist
    n_w, me = world_size(), rank()
    comm = _comm_device(torch.empty(0))
    mine = {k: compute(k) for i, k in enumerate(keys) if i % n_w == me}
    out = {}
    for i, k in enumerate(keys):
        src = i % n_w
        size = torch.zeros(1, dtype=torch.int64, device=comm)
        if src == me:
            buf = io.BytesIO()
            torch.save(mine[k], buf)
            data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8).to(comm)
            size[0] = data.numel()
        dist.broadcast(size, src=src)
        if src != me:
            data = torch.empty(int(size.item()), dtype=torch.uint8, device=comm)
        dist.broadcast(data, src=src)
        if src == me:
            out[k] = mine[k]
        else:
            # full unpickling: the bytes come from this job's own rank, not from a file
            out[k] = torch.load(io.BytesIO(data.cpu().numpy().tobytes()),
                                map_location=device or "cpu", weights_only=False)
    return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def check_ranks_agree(**what) -> None:
    """Raises :class:`RanksDisagree` (on every rank) when the ranks were given different values
    of any keyword (JSON-normalisable: the run's recorded settings, a fingerprint of the
    calibration data, ...), naming the keyword and the ranks' values."""
    if not _active():
        return
    import torch.distributed as dist
    mine = {k: (_digest(v), v) for k, v in what.items()}
    gathered: List[dict] = [None] * world_size()
    dist.all_gather_object(gathered, mine, group=None)
    diffs = []
    for k in what:
        digests = [g[k][0] for g in gathered]
        if len(set(digests)) > 1:
            values = [g[k][1] for g in gathered]
            detail = _first_difference(values)
            diffs.append(f"{k} ({detail})")
    if diffs:
        raise RanksDisagree("distributed run: the ranks disagree on " + "; ".join(diffs)
                            + ": every rank must be started with the same arguments and "
                            "calibration data")


def _first_difference(values: list) -> str:
    """A short description of how the ranks' values differ (keys of dicts that differ, else the
    values)."""
    if all(isinstance(v, dict) for v in values):
        keys = sorted(set().union(*values))
        for key in keys:
            per_rank = [v.get(key, "<absent>") for v in values]
            if any(p != per_rank[0] for p in per_rank):
                return f"{key}: " + ", ".join(f"rank {r} {p!r}" for r, p in enumerate(per_rank))
    return ", ".join(f"rank {r} {str(v)[:80]!r}" for r, v in enumerate(values))
