"""Run a function on K CPU processes joined by a gloo process group, as torchrun would start them.

Distributed code paths are tested on any machine: each process gets torchrun's
variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT`` on a free local port), so :func:`imtm.engine.distributed.setup`
starts the process group exactly as it does under torchrun. A process that
fails reports its traceback; one that hangs is killed after ``timeout``
seconds and the call raises instead of blocking a test suite.

Example (``fn`` must be importable by module name, since processes are spawned)::

    from imtm.testing.distributed import run_ranks
    results = run_ranks(my_module.worker, nprocs=2, args=(8,), timeout=60)
"""

from __future__ import annotations

import os
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch.multiprocessing as mp

__all__ = ["free_port", "run_ranks"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _plain(x: Any) -> Any:
    """Tensors as NumPy arrays: they cross the process boundary by value, not through shared memory
    that vanishes when the process exits."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    return x


def _entry(fn: Callable, rank: int, world: int, port: int, args: Sequence[Any], results) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "TQDM_DISABLE": "1",
        }
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        out = fn(rank, *args)
        results.put((rank, "ok", _plain(out)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable, nprocs: int = 2, args: Sequence[Any] = (), timeout: float = 120.0
) -> list[Any]:
    """Call ``fn(rank, *args)`` in ``nprocs`` spawned processes; return their results by rank.

    Tensors in the results (in dicts, lists, tuples) come back as NumPy arrays.

    Raises:
        RuntimeError: a process raised (its traceback is in the message) or died.
        TimeoutError: the processes did not all finish within ``timeout`` seconds (they are killed).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, nprocs, port, tuple(args), results), daemon=True)
        for r in range(nprocs)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < nprocs:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"run_ranks: {nprocs - len(out)} of {nprocs} processes did not finish "
                    f"within {timeout:.0f}s (a collective call waiting for a rank?)"
                )
            try:
                rank, status, value = results.get(timeout=min(left, 1.0))
            except queue_module.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and len(out) < nprocs and results.empty():
                    # The empty queue is how the death showed, not its cause: no exception chain.
                    raise RuntimeError(
                        f"run_ranks: a process exited with code {dead[0].exitcode} without a result"
                    ) from None
                continue
            if status == "error":
                raise RuntimeError(f"run_ranks: rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        finished = len(out) == nprocs
        for p in procs:
            p.join(timeout=5 if finished else 0)  # after a failure the others may wait forever
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [out[r] for r in range(nprocs)]
