"""Distributed helpers: PyTorch's own process group, started the way ``torchrun`` describes it.

``torchrun --nproc_per_node=K script.py`` (or ``python -m torch.distributed.run``)
starts K processes and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` in each. :func:`setup` reads them and
initialises the default process group once (NCCL for CUDA devices, gloo
otherwise); every other function here is a no-op, or the identity, in a single
process, so the engine calls them unconditionally.

What lives here:

- rank helpers: :func:`is_distributed`, :func:`rank`, :func:`world_size`,
  :func:`is_main`, :func:`barrier`, :func:`local_device`;
- :func:`gather_with_grad`: all-gather along the batch axis with the gradient
  sent back to the rank that owns each row (rows may differ in number per rank);
  :func:`gather_value` does the same for :class:`~imtm.tokens.Tokens`;
- :func:`gather_rows_to_main`, :func:`broadcast_object`: results to rank 0, and
  small decisions from rank 0 to every rank;
- :class:`ShardedBatchSampler`: each rank's share of one global batch order.

Why the gradient is summed over ranks. Every rank computes the loss of the
*whole* gathered batch (all ranks' negatives), so every rank holds the same
``dL/dx`` for every gathered row. The backward of :func:`gather_with_grad`
all-reduces that gradient (a sum, ``K`` identical terms) and keeps the local
rows: ``K dL/dx_local``. DistributedDataParallel then *averages* the parameter
gradients over the ``K`` ranks, which turns the ``K`` partial sums into exactly
the gradient of one process that saw the combined batch, while blocks that run
after the gather (scorers, a learned temperature) get the same full gradient on
every rank and keep it through the average. open_clip's gathered loss keeps
only the local gradient instead (``gather_with_grad=False``), which matches the
combined batch up to a factor ``1/K`` absorbed by the learning rate; imtm wants
it exact.

Example:
    >>> from imtm.engine import distributed
    >>> distributed.world_size(), distributed.rank(), distributed.is_main()
    (1, 0, True)
    >>> distributed.shard_range(10, rank=1, world=3)
    (4, 7)
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from imtm.engine.order import EpochSampler
from imtm.tokens import Tokens

__all__ = [
    "ENV_VARS",
    "ShardedBatchSampler",
    "barrier",
    "broadcast_object",
    "cpu_group",
    "env_world_size",
    "gather_rows_to_main",
    "gather_value",
    "gather_with_grad",
    "is_distributed",
    "is_main",
    "local_device",
    "local_rank",
    "rank",
    "setup",
    "shard_range",
    "world_size",
]

#: The variables torchrun sets in every process it starts.
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

#: How long a collective waits for the other ranks before failing (a hang becomes an error).
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)

_CPU_GROUP: Any = None


# ---------------------------------------------------------------------------- process group
def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as err:
        raise ValueError(
            f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}"
        ) from err


def local_rank() -> int:
    """``LOCAL_RANK`` from the environment (0 when unset): which GPU of the node this process drives."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_device(device: torch.device) -> torch.device:
    """Pin an index-less CUDA device to this process's GPU (``cuda:LOCAL_RANK``) under torchrun."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and env_world_size() > 1:
        return torch.device("cuda", local_rank())
    return device


def setup(
    device: torch.device | str | None = None, *, timeout: datetime.timedelta = DEFAULT_TIMEOUT
) -> bool:
    """Initialise the default process group from torchrun's variables, once; say whether one is running.

    Does nothing in a single process (no ``WORLD_SIZE`` > 1), or when a process group
    already exists (for example one the caller started). The backend is NCCL when
    ``device`` is a CUDA device and gloo otherwise.

    Returns:
        True when this process is one of several in a process group.

    Raises:
        RuntimeError: ``WORLD_SIZE`` > 1 but the other variables torchrun sets are missing.
    """
    if not dist.is_available():
        return False
    if not dist.is_initialized():
        if env_world_size() <= 1:
            return False
        missing = [v for v in ENV_VARS if v not in os.environ]
        if missing:
            raise RuntimeError(
                f"imtm: WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} are not set; start the script with "
                "torchrun --nproc_per_node=K (or python -m torch.distributed.run), or unset WORLD_SIZE"
            )
        dev = local_device(torch.device(device) if device is not None else torch.device("cpu"))
        backend = "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            backend = "nccl"
        dist.init_process_group(backend=backend, timeout=timeout)
    return dist.get_world_size() > 1


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes (1 outside a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def cpu_group():
    """A process group for CPU tensors: the default one under gloo, a gloo group beside NCCL.

    Created on first use; every rank must reach that first use (it is a collective call).
    """
    global _CPU_GROUP
    if dist.get_backend() == "gloo":
        return None
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo")
    return _CPU_GROUP


def shard_range(n: int, *, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``n`` that rank ``rank`` of ``world`` owns: contiguous, sizes differ by at most 1."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


# ---------------------------------------------------------------------------- gathers
def _all_sizes(n: int, device: torch.device, group=None) -> list[int]:
    size = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    return [int(s) for s in sizes]  # one host synchronisation per gather, outside any forward


def _pad_gather(x: torch.Tensor, sizes: Sequence[int], group=None) -> torch.Tensor:
    """Gather ``x`` (``(sizes[rank], ...)``) from every rank, padding to the largest then unpadding."""
    m = max(sizes)
    if x.shape[0] != m:
        x = torch.cat([x, x.new_zeros((m - x.shape[0], *x.shape[1:]))])
    bufs = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(bufs, x.contiguous(), group=group)
    return torch.cat([b[:s] for b, s in zip(bufs, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = list(sizes), group
        ctx.rank = dist.get_rank(group)
        return _pad_gather(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        # Every rank holds the gradient of its own copy of the loss for every gathered row;
        # sum them (all_reduce, which gloo supports, where reduce_scatter it does not) and
        # keep this rank's rows. See the module docstring for why a sum.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def gather_with_grad(x: torch.Tensor, *, group=None) -> torch.Tensor:
    """Concatenate ``x`` of every rank along dim 0 (rank order), the gradient flowing to each row's owner.

    Ranks may hold different numbers of rows. In a single process ``x`` comes back unchanged.

    Shape:
        - x: ``(B_r, ...)`` on rank r
        - output: ``(sum_r B_r, ...)``, identical on every rank

    Example:
        >>> gather_with_grad(torch.ones(2, 3)).shape  # one process: the identity
        torch.Size([2, 3])
    """
    if not is_distributed():
        return x
    sizes = _all_sizes(x.shape[0], x.device, group)
    if x.requires_grad:
        return _GatherWithGrad.apply(x, sizes, group)
    return _pad_gather(x, sizes, group)


def _gather_widths(x: torch.Tensor, sizes: Sequence[int], width: int, group=None):
    """Pad the token axis (dim 1) to ``width`` before a row gather."""
    if x.shape[1] != width:
        pad = x.new_zeros((x.shape[0], width - x.shape[1], *x.shape[2:]))
        x = torch.cat([x, pad], dim=1)
    if x.requires_grad:
        return _GatherWithGrad.apply(x, sizes, group)
    return _pad_gather(x, sizes, group)


def gather_value(value: Any, *, group=None) -> Any:
    """:func:`gather_with_grad` for a batch value: a tensor, :class:`Tokens` (token axes padded
    to the longest over ranks; the mask marks the padding) or a list (gathered as objects).

    Example:
        >>> gather_value(Tokens(torch.zeros(2, 3, 4))).feats.shape
        torch.Size([2, 3, 4])
    """
    if not is_distributed():
        return value
    if isinstance(value, Tokens):
        n, width = value.batch_size, value.num_tokens
        info = torch.tensor([n, width], dtype=torch.long, device=value.device)
        infos = [torch.zeros_like(info) for _ in range(dist.get_world_size(group))]
        dist.all_gather(infos, info, group=group)
        sizes = [int(i[0]) for i in infos]
        width = max(int(i[1]) for i in infos)
        feats = _gather_widths(value.feats, sizes, width, group)
        mask = _gather_widths(value.mask, sizes, width, group)
        return Tokens(feats, mask, grid=value.grid, num_prefix_tokens=value.num_prefix_tokens)
    if isinstance(value, torch.Tensor):
        return gather_with_grad(value, group=group)
    if isinstance(value, (list, tuple)):
        parts: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, list(value), group=group)
        return [x for p in parts for x in p]
    raise TypeError(
        f"cannot gather a batch value of type {type(value).__name__} across ranks; "
        "blocks that run on the gathered batch must read tensors, Tokens or lists"
    )


def gather_rows_to_main(x: torch.Tensor) -> torch.Tensor | None:
    """Concatenate the CPU tensor ``x`` of every rank along dim 0 on rank 0; other ranks get ``None``.

    Uses :func:`cpu_group` so that an NCCL job need not copy the rows to a GPU.
    """
    if not is_distributed():
        return x
    group = cpu_group()
    sizes = _all_sizes(x.shape[0], torch.device("cpu"), group)
    m = max(sizes)
    if x.shape[0] != m:
        x = torch.cat([x, x.new_zeros((m - x.shape[0], *x.shape[1:]))])
    x = x.contiguous()
    if dist.get_rank() == 0:
        bufs = [torch.empty_like(x) for _ in sizes]
        dist.gather(x, bufs, dst=0, group=group)
        return torch.cat([b[:s] for b, s in zip(bufs, sizes)])
    dist.gather(x, None, dst=0, group=group)
    return None


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (small picklable values such as a metrics dict)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=cpu_group())
    return box[0]


def all_gather_objects(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=cpu_group())
    return out


def max_over_ranks(value: int | torch.Tensor) -> int:
    """The largest of every rank's ``value`` (a small non-negative integer or a 0-d tensor), on every rank.

    A collective: every rank must call it at the same point. Training uses it so that a
    decision one rank would take alone (skip a step whose loss is NaN there) is taken by
    all of them, or the ranks would wait on different collectives and deadlock. A tensor
    on a CUDA device is reduced there (NCCL), without a host round trip before the reduction.
    In a single process it is ``int(value)``.

    Example:
        >>> max_over_ranks(torch.tensor(True))
        1
    """
    if not is_distributed():
        return int(value)
    t = torch.as_tensor(value).detach().reshape(1).to(torch.int64)
    group = None
    if t.device.type != "cuda" or dist.get_backend() == "gloo":
        t, group = t.cpu(), cpu_group()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into ``module`` on every rank (as DDP does when built).

    A no-op in a single process.
    """
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=src)


def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over the ranks, in place, in one all-reduce per dtype.

    What DistributedDataParallel does at the end of a backward pass, for a step whose
    backward runs in several passes outside DDP (gradient accumulation with cached
    embeddings: DDP's ``no_sync`` for every pass, then one synchronisation). A parameter
    with a gradient on some ranks only gets zeros on the others, as under DDP's
    ``find_unused_parameters``; one with a gradient on no rank keeps ``None``.
    A no-op in a single process.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(2)); p.grad = torch.full((2,), 3.0)
        >>> average_gradients([p]); p.grad  # one process: unchanged
        tensor([3., 3.])
    """
    if not is_distributed():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    present = [p for p, h in zip(params, has.tolist()) if h]
    world = dist.get_world_size()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in present:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


__all__ += ["all_gather_objects", "average_gradients", "broadcast_module", "max_over_ranks"]


# ---------------------------------------------------------------------------- data order
class ShardedBatchSampler(Sampler):
    """This rank's batches of one global batch order: K ranks with batch b see one process's batches of K*b.

    The epoch's order is a permutation fixed by ``(seed, epoch)`` (the same on every
    rank, and the same as a single process's :class:`~imtm.engine.order.EpochSampler`).
    Global batch ``t`` is ``order[t*K*b : (t+1)*K*b]``; rank ``r`` takes its ``r``-th
    contiguous share (sizes differ by at most one), so gathering the shares in rank
    order gives back exactly the global batch. When the last global batch holds fewer
    items than there are ranks, it is topped up with the first items of the order (as
    :class:`torch.utils.data.DistributedSampler` pads), because a rank with no data
    would stall the others.

    Args:
        n: dataset size. batch_size: ``b``, per rank. seed, epoch: fix the order.
        rank, world: this rank and the number of ranks.
        start_batch: skip this many global batches (resuming mid-epoch).
        shuffle: permute (True) or keep the dataset order.

    Example:
        >>> [list(b) for b in ShardedBatchSampler(10, 2, seed=0, epoch=0, rank=1, world=2, shuffle=False)]
        [[2, 3], [6, 7], [9]]
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        rank: int,
        world: int,
        start_batch: int = 0,
        shuffle: bool = True,
    ):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.rank, self.world, self.start_batch, self.shuffle = rank, world, start_batch, shuffle

    def order(self) -> list[int]:
        return EpochSampler(self.n, self.seed, self.epoch, shuffle=self.shuffle).order()

    def __len__(self) -> int:
        glob = self.batch_size * self.world
        return max(0, -(-self.n // glob) - self.start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        glob = self.batch_size * self.world
        for t in range(self.start_batch, -(-self.n // glob)):
            batch = order[t * glob : (t + 1) * glob]
            if len(batch) < self.world:
                batch = batch + [order[j % self.n] for j in range(self.world - len(batch))]
            a, b = shard_range(len(batch), rank=self.rank, world=self.world)
            yield batch[a:b]
