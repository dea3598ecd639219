"""DDP plumbing: process-group setup from torchrun's environment, and the `--gpus N` self-relaunch.

Launch on N GPUs (what `muse train --gpus N ...` runs for you):

    python -m torch.distributed.run --standalone --nproc_per_node N $(which muse) train ...

Each process reads RANK / WORLD_SIZE / LOCAL_RANK from the environment; the backend is nccl on CUDA
and gloo on CPU. A plain `muse train` (no torchrun variables) is a single process with world size 1
and no process group at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Set in the children of a `--gpus N` relaunch, so they never relaunch again.
CHILD_ENV = "MUSE_DDP_CHILD"
# How long a collective may wait (`--nccl-timeout`). At each epoch end the other ranks wait in a
# collective while rank 0 validates and writes best/last weights and state.pt; torch's default (10
# minutes for NCCL) can run out on a large validation set or a slow disk and kill a healthy run.
# Two hours covers that; a real hang still ends.
DEFAULT_TIMEOUT_S = 7200.0


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: str | None = None, timeout_s: float | None = None) -> DistContext:
    """Join the process group when started by torchrun (or a test's spawner); else a world of one.

    `device`: "cpu", "cuda" or None (CUDA when available). Under DDP on CUDA each rank takes
    cuda:LOCAL_RANK. `timeout_s`: the collectives' timeout (default DEFAULT_TIMEOUT_S).
    """
    timeout = process_group_timeout(timeout_s)
    want_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    if not launched_by_torchrun():
        dev = torch.device(device if device else ("cuda" if want_cuda else "cpu"))
        return DistContext(0, 1, 0, dev)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo", rank=rank, world_size=world,
                                timeout=timeout)
    return DistContext(rank, world, local_rank, dev)


def process_group_timeout(timeout_s: float | None) -> timedelta:
    """The timeout for init_process_group; InputError unless it is a positive number of seconds."""
    from muse_pipeline.errors import InputError

    seconds = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
    if not seconds > 0:
        raise InputError(f"--nccl-timeout must be a positive number of seconds, got {timeout_s!r}")
    return timedelta(seconds=seconds)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.barrier()


def broadcast_object(ctx: DistContext, obj: object) -> object:
    """Rank 0's `obj` on every rank (used for decisions only rank 0 can make, e.g. 'stop')."""
    if not (ctx.distributed and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def relaunch_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The torchrun command line that re-runs this CLI invocation on `nproc` processes.

    `argv` is sys.argv with `--gpus N` already removed; argv[0] is the `muse` script (a Python file).
    """
    if nproc < 1:
        raise ValueError(f"--gpus must be >= 1, got {nproc}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *argv,
    ]


def relaunch(nproc: int, argv: Sequence[str]) -> int:
    """Run the torchrun command and return its exit status."""
    env = dict(os.environ)
    env[CHILD_ENV] = "1"
    return subprocess.call(relaunch_command(nproc, argv), env=env)


def strip_gpus_flag(argv: Sequence[str]) -> list[str]:
    """argv without `--gpus N` / `--gpus=N` (so that the children run the same command once each)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--gpus":
            skip = True
            continue
        if a.startswith("--gpus="):
            continue
        out.append(a)
    return out
