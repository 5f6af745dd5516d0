"""Many processes (``torchrun``): process-group setup from torchrun's environment, rank and world,
rank-0-only writing, the few collectives the quantize stage needs, and teardown.

Every helper is a no-op in a single process (no process group), so library code calls them
unconditionally. Collectives run on CPU tensors over gloo; for work on CUDA the group is NCCL (one
GPU per local rank) and tensors travel through the current device. A failure on one rank reaches the
others: :func:`agree` shares errors at the points every rank reaches, a dead peer breaks the next
collective (gloo reports it at once), and every collective has a timeout (``DQDEPLOY_DIST_TIMEOUT``
seconds, default 1800).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..core.errors import DQDeployError
from .launch import launch, launched

T = TypeVar("T")
TIMEOUT_ENV = "DQDEPLOY_DIST_TIMEOUT"
_WORLD_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(DQDeployError):
    """The process group could not be set up, a collective failed, or another rank failed."""


def active() -> bool:
    """Whether a process group of more than one process is set up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    """Whether this process writes outputs: rank 0 only (torchrun's ``RANK`` before the group is up)."""
    return rank() == 0 if active() else int(os.environ.get("RANK", "0")) == 0


def shard(n: int) -> range:
    """This rank's items of ``0 .. n-1``: every ``world()``-th, starting at ``rank()``."""
    return range(rank(), n, world())


def collective_timeout() -> datetime.timedelta:
    """The collective timeout from ``DQDEPLOY_DIST_TIMEOUT`` (seconds, default 1800), or :class:`DistributedError`."""
    raw = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise DistributedError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds",
                               hint=f"unset {TIMEOUT_ENV} or set e.g. 3600")
    return datetime.timedelta(seconds=seconds)


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def session(device: str | torch.device = "cpu") -> Iterator[None]:
    """Set up the process group from torchrun's environment for the ``with`` body (nothing in a single
    process, or when a group is already up): gloo when the work runs on ``device`` CPU, NCCL (one
    GPU per local rank) when it runs on CUDA."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield
        return
    missing = [k for k in _WORLD_ENV if k not in os.environ]
    if missing or not dist.is_available():
        raise DistributedError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but "
                               f"{', '.join(missing) or 'torch.distributed'} is missing",
                               hint="start many processes with torchrun (or `dqdeploy quantize ... --nproc N`)")
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_nccl_available() or local >= torch.cuda.device_count():
            raise DistributedError(f"local rank {local} needs its own CUDA device; {torch.cuda.device_count()} visible",
                                   hint="start at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(local)
    try:
        dist.init_process_group(backend, timeout=collective_timeout())
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"cannot join the process group ({backend}): {exc}",
                               hint="check torchrun's --rdzv-endpoint / --master-addr "
                                    "and that every node can reach it") from None
    try:
        yield
    finally:
        dist.destroy_process_group()


def _collective(what: str):
    """Turn a backend failure (a peer died, a timeout) into a typed error."""
    @contextlib.contextmanager
    def guard() -> Iterator[None]:
        try:
            yield
        except (RuntimeError, dist.DistBackendError) as exc:
            raise DistributedError(f"rank {rank()}: {what} failed, "
                                   f"another rank probably stopped ({str(exc).splitlines()[0]})",
                                   hint="read the first error printed by the other ranks") from None
    return guard()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``tensor`` reduced over every rank (``sum``, ``min`` or ``max``), in place and returned."""
    if not active():
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    buf = tensor.to(_device())
    with _collective(f"all-reduce ({op})"):
        dist.all_reduce(buf, op=ops[op])
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def all_gather(obj: T) -> list[T]:
    """``obj`` of every rank, in rank order (pickled between the processes of this job only)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world()
    with _collective("gather"):
        dist.all_gather_object(out, obj)
    return out


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box: list[Any] = [obj]
    with _collective("broadcast"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(error: BaseException | None, stage: str) -> None:
    """A point every rank reaches: when any rank brings an error, every rank raises (its own error,
    or a :class:`DistributedError` naming the rank that failed and why)."""
    if not active():
        if error is not None:
            raise error
        return
    found = all_gather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, msg) for r, msg in enumerate(found) if msg is not None]
    if failed:
        r, msg = failed[0]
        raise DistributedError(f"rank {r} failed while {stage}: {msg}",
                               hint="fix the error reported by that rank and re-run every rank")


@contextlib.contextmanager
def agreed(stage: str) -> Iterator[None]:
    """A block whose error (an ``Exception``) reaches every rank: :func:`agree` at its end."""
    error = None
    try:
        yield
    except Exception as exc:  # every rank learns of it before any collective work
        error = exc
    agree(error, stage)


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over every rank (a rank without a gradient adds zeros; a
    parameter no rank has a gradient for keeps none, as in one process)."""
    if not active() or not params:
        return
    has = all_reduce(torch.tensor([float(p.grad is not None) for p in params]), "max")
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for p, present in zip(params, has.tolist()):
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone() if present else None
        offset += p.numel()


def launch_many(nproc: int, resume: bool, argv: list[str]) -> int:
    """``dqdeploy ARGV`` as ``nproc`` local processes under torchrun (its exit status); refused under
    torchrun already, and with ``resume`` (many-process runs keep no checkpoint)."""
    if resume:
        raise DistributedError("--resume continues one-process runs only: many-process runs keep no checkpoint",
                               hint="drop --nproc to resume, or start afresh without --resume")
    if launched():
        raise DistributedError("--nproc starts torchrun itself, and this process already runs under torchrun",
                               hint="drop --nproc when running under torchrun")
    return launch(nproc, argv)
