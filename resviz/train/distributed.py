"""Scale-out with ``torchrun``: data-parallel training and configuration sweeps across processes.

Training runs unchanged under ``torchrun --nproc_per_node=N python -m resviz train ...``:
:func:`init_distributed` reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and joins the process group
(gloo on CPU, NCCL on GPU); :class:`DataParallel`, the wrapper the eager loop accepts, gives each rank
its slice of the same seeded global batch and wraps every net in ``DistributedDataParallel``
(:class:`DistributedTrainer` is a Trainer built with it), so the gradients (averaged over ranks
of equal slices) are those of the whole global batch and the run matches a single-process run of the
same global batch up to floating-point summation order. Only rank 0 writes files or prints.

BatchNorm: each rank normalises over its own slice, so with ``norm="batch"`` the result differs from a
single-process run. On GPU the nets are converted to ``SyncBatchNorm`` (statistics over the global
batch); PyTorch's SyncBatchNorm does not run on CPU tensors, so on CPU use ``norm="group"`` or
``"none"`` when the runs must agree exactly. Stochastic depth draws the same masks on every rank for
different slices of the batch, which also breaks exact agreement.

:func:`sweep` spreads independent configurations over ranks (rank r takes items r, r+N, ...) and
gathers the results, in the original order, on every rank.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from resviz.train.state import NetState
from resviz.train.trainer import Trainer

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a ``torchrun`` job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info(environ: dict[str, str] | None = None) -> DistInfo:
    """Rank, world size and local rank from torchrun's environment variables (defaults: alone)."""
    env = os.environ if environ is None else environ
    try:
        rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {e}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def current() -> DistInfo:
    """This process's place in the initialised process group (alone when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), env_info().local_rank)
    return DistInfo()


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when started by torchrun with more than one process; else do nothing.

    Args:
        device: the training device setting; "cuda" (or "auto" with a GPU) selects NCCL and pins this
            process to GPU ``LOCAL_RANK``, anything else selects gloo.
    """
    info = env_info()
    if not info.enabled or dist.is_initialized():
        return current() if info.enabled else info
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if cuda:
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return info


def shutdown() -> None:
    """Leave the process group (no-op when not in one).

    Every rank waits for the others first: a rank that tears gloo down while a peer is still sending
    can abort the peer's process at exit ("terminate called without an active exception").
    """
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def is_main() -> bool:
    """True on rank 0 (and when running alone): the one process that writes files and prints."""
    return current().is_main


def shard(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of a global batch whose size ``world_size`` divides."""
    if len(batch) % world_size:
        raise ValueError(f"global batch of {len(batch)} cannot be split evenly over {world_size} processes")
    n = len(batch) // world_size
    return batch[rank * n : (rank + 1) * n]


def _has_unused_params(net: nn.Module) -> bool:
    """Whether some parameters take no part in the forward pass (plain blocks keep unused projections)."""
    blocks = getattr(net, "blocks", [])
    return any(b.removed or (not b.skip and any(True for _ in b.shortcut.parameters())) for b in blocks)


class DataParallel:
    """DistributedDataParallel as the eager loop (:class:`resviz.train.loops.EagerLoop`) sees it.

    Every rank draws the same global batch (same seed, same augmentation) and trains on its slice;
    DDP averages the gradients, and the logged loss and accuracy are averaged over ranks, so each
    record describes the global batch.
    """

    supports_graphs = False  # DDP's gradient all-reduce is not captured; the eager loop runs

    def __init__(self, info: DistInfo, device: torch.device) -> None:
        self.rank, self.world_size, self.device = info.rank, info.world_size, device

    def wrap(self, state: NetState) -> None:
        ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else None
        state.module = DistributedDataParallel(state.net, device_ids=ids,
                                               find_unused_parameters=_has_unused_params(state.net))

    def shard(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return shard(xb, self.rank, self.world_size), shard(yb, self.rank, self.world_size)

    def reduce(self, metrics: list[torch.Tensor]) -> list[torch.Tensor]:
        loss, correct, gnorm, pnorm = metrics
        both = torch.stack([loss, correct])
        dist.all_reduce(both)  # gloo has no AVG: sum, then divide
        both = both / self.world_size
        return [both[0], both[1], gnorm, pnorm]  # gradient and weight norms already agree across ranks


class DistributedTrainer(Trainer):
    """A :class:`~resviz.train.trainer.Trainer` whose eager loop runs with :class:`DataParallel`.

    Evaluation runs the whole test split on every rank.

    Args:
        sync_bn: convert BatchNorm to SyncBatchNorm (default: on GPU only; it cannot run on CPU).
        Others as for :class:`~resviz.train.trainer.Trainer`.
    """

    supports_graphs = DataParallel.supports_graphs

    def __init__(self, nets: dict[str, nn.Module] | nn.Module, data: Any, cfg: Any, *, probes: bool = False,
                 sync_bn: bool | None = None) -> None:
        info = current()
        if not info.enabled:
            raise RuntimeError("DistributedTrainer needs an initialised process group; call init_distributed() first")
        super().__init__(nets, data, cfg, probes=probes)
        self.rank, self.world_size = info.rank, info.world_size
        if self.batch_size % self.world_size:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of the {self.world_size} processes")
        if sync_bn if sync_bn is not None else self.device.type == "cuda":
            self.nets = {k: nn.SyncBatchNorm.convert_sync_batchnorm(n) for k, n in self.nets.items()}
        self.parallel = DataParallel(info, self.device)


def sweep(items: Sequence[T], fn: Callable[[T], R]) -> list[R]:
    """``[fn(item) for item in items]``, with item i computed on rank ``i % world_size``.

    Every rank receives the full list in the original order (``all_gather_object``; results must be
    picklable). Alone, this is a plain loop.
    """
    info = current()
    mine = [(i, fn(item)) for i, item in enumerate(items) if i % info.world_size == info.rank]
    if not info.enabled:
        return [r for _, r in mine]
    gathered: list[list[tuple[int, R]] | None] = [None] * info.world_size
    dist.all_gather_object(gathered, mine)
    flat = sorted((pair for part in gathered for pair in (part or [])), key=lambda p: p[0])
    return [r for _, r in flat]


def unwrap(net: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or ``net`` itself)."""
    return net.module if isinstance(net, DistributedDataParallel) else net
