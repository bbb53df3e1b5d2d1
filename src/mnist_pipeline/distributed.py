"""Data-parallel training over processes started by torchrun (torch.distributed + DDP).

A process that torchrun did not start is a world of one: no process group, and training runs
exactly as it does without this module. Under torchrun every rank draws the same seeded
permutation, trains on its slice of each global batch (`shard`), DistributedDataParallel
averages the gradients, and rank 0 alone writes files and talks to MLflow. The checks that
refuse a launch (`check_world`) run before any work, in the launching process and in each rank.
"""

from __future__ import annotations

import datetime
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from .errors import PipelineError

T = TypeVar("T")
BACKENDS = ("auto", "gloo", "nccl")
# How long a rank waits for the others (e.g. while rank 0 registers the model).
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # on this machine: the GPU it uses
    local_size: int = 1
    backend: str | None = None  # 'gloo' | 'nccl' once the process group is up

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the ranks, in place."""
        if self.backend is not None:
            torch.distributed.all_reduce(tensor)
        return tensor

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        if self.backend is None:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.backend is None:
            return [obj]
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.backend is not None:
            torch.distributed.barrier()


SINGLE = World()


def launched_by_torchrun(env: Mapping[str, str]) -> bool:
    return "LOCAL_RANK" in env and "WORLD_SIZE" in env


def world_from_env(env: Mapping[str, str]) -> World:
    """Rank and sizes as torchrun sets them (a world of one outside torchrun)."""
    if not launched_by_torchrun(env):
        return SINGLE
    return World(rank=int(env["RANK"]), size=int(env["WORLD_SIZE"]),
                 local_rank=int(env["LOCAL_RANK"]),
                 local_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])))


def choose_backend(requested: str, device: torch.device) -> str:
    """'auto': NCCL on CUDA, gloo on the CPU. NCCL without CUDA is refused."""
    if requested not in BACKENDS:
        raise PipelineError(f"distributed backend {requested!r}: expected one of "
                            f"{', '.join(BACKENDS)} (MNIST_DIST_BACKEND)")
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise PipelineError("distributed backend 'nccl' needs CUDA GPUs, but training runs on "
                            f"{device.type}: use gloo (MNIST_DIST_BACKEND=auto or gloo)")
    return requested


def check_world(batch_size: int, compile_step: bool, world_size: int, local_size: int,
                device: torch.device, gpu_count: int) -> None:
    """Refuse, naming the param, a world this training cannot run in."""
    if batch_size % world_size:
        raise PipelineError(
            f"params: train.batch_size: {batch_size} images per step do not divide evenly "
            f"over {world_size} processes; choose a batch size that is a multiple of the "
            "world size (train.nproc x nodes)")
    if world_size > 1 and compile_step:
        raise PipelineError("params: train.compile: not supported with more than one "
                            "training process; set train.compile: false or train.nproc: 1")
    if device.type == "cuda" and local_size > gpu_count:
        raise PipelineError(f"params: train.nproc: {local_size} processes on this machine, "
                            f"but it has {gpu_count} CUDA GPU(s): one GPU per process")


def _check_here(batch_size: int, compile_step: bool, world_size: int, local_size: int,
                device: torch.device) -> None:
    """`check_world` against this machine's GPUs."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    check_world(batch_size, compile_step, world_size, local_size, device, gpus)


def shard(order: torch.Tensor, step: int, batch_size: int, world: World) -> torch.Tensor:
    """This rank's slice of global batch `step` of the permutation `order`: the images seen
    per step are the same for any world size."""
    local = batch_size // world.size
    start = step * batch_size + world.rank * local
    return order[start : start + local]


def rank_seed(seed: int, rank: int) -> int:
    """An independent seed for each rank's own random draws (augmentation)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def threads_per_rank(requested: int, local_size: int, cores: int) -> tuple[int, str | None]:
    """CPU threads for each rank so that ranks x threads stays within the cores; and a note
    when the request had to be cut."""
    fair = max(1, cores // local_size)
    if requested <= 0:
        return fair, None
    if requested * local_size > cores:
        return fair, (f"{requested} threads x {local_size} processes exceed the {cores} "
                      f"cores: using {fair} thread(s) per process")
    return requested, None


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def start(world: World, backend: str, device: torch.device) -> World:
    """Join the process group (this rank's GPU first, on CUDA); the world with its backend."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend, timeout=TIMEOUT)
    return replace(world, backend=backend)


def stop(world: World) -> None:
    """Wait for every rank, then leave the process group."""
    if world.backend is not None:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def wrap(module: nn.Module, world: World, device: torch.device) -> nn.Module:
    """`module` under DistributedDataParallel (itself outside a process group)."""
    if world.backend is None:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def sync_batchnorm(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """BatchNorm statistics over all ranks on CUDA; on the CPU, where SyncBatchNorm does not
    run, each rank normalises by its own slice of the batch."""
    if world.backend is None or device.type != "cuda":
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def plain_batchnorm(model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """If `model` has SyncBatchNorm layers, its weights in a new `build()` network with plain
    BatchNorm (for export); else `model` itself."""
    if not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        return model
    plain = build()
    plain.load_state_dict(model.state_dict())
    return plain.to(next(model.parameters()).device).train(model.training)


def torchrun_command(nproc: int, launch_args: str, argv: Sequence[str]) -> list[str]:
    """The torchrun command that runs this script (`argv`) in `nproc` processes per machine;
    `launch_args` are torchrun's own options (default --standalone: one machine)."""
    runner = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    try:
        options = shlex.split(launch_args) or ["--standalone"]
    except ValueError as exc:  # an unclosed quote
        raise PipelineError(f"MNIST_TORCHRUN_ARGS {launch_args!r}: {exc}") from None
    return [runner, *options, f"--nproc-per-node={nproc}", *argv]


def plan_torchrun(nproc: int, device: torch.device, backend: str, batch_size: int,
                  compile_step: bool, threads: int, env: Mapping[str, str],
                  argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The torchrun command (and its environment) that runs `argv` in `nproc` processes per
    machine, once the checks that can be made before the launch pass. $MNIST_TORCHRUN_ARGS
    holds torchrun's own options (default --standalone)."""
    choose_backend(backend, device)
    _check_here(batch_size, compile_step, nproc, nproc, device)
    command = torchrun_command(nproc, env.get("MNIST_TORCHRUN_ARGS", ""), argv)
    # each rank's thread count from its start (join sets it again, as the rank decides)
    count, _ = threads_per_rank(threads, nproc, available_cores())
    return command, {**env, "OMP_NUM_THREADS": str(count)}


def join(env: Mapping[str, str], device: torch.device, backend: str, batch_size: int,
         compile_step: bool, threads: int) -> tuple[World, torch.device, str | None]:
    """In a process torchrun started: check the world, choose this rank's device (its own GPU
    on CUDA) and CPU threads, join the process group. (world, device, note on threads)."""
    world = world_from_env(env)
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    backend = choose_backend(backend, device)
    _check_here(batch_size, compile_step, world.size, world.local_size, device)
    count, note = threads_per_rank(threads, world.local_size, available_cores())
    torch.set_num_threads(count)
    return start(world, backend, device), device, note
