"""Helpers for DDP jobs that run unchanged under torchrun, Ray Train or the local launcher.

A job is a picklable function `fn(spec)` (module level; the spec a frozen dataclass such as
`pipeline.train.trainloop.TeacherJob`) that calls `init_from_env()` (a no-op when the launcher has already set up
the process group, as Ray Train does), places itself on `device_for_rank()`, wraps its model in
DistributedDataParallel when `dist_info()[1] > 1`, and returns a small picklable value from rank 0.
`launch_local` runs such a job in this process (1 worker) or in spawned processes: it is the local
executor's `launch_ddp`. No Ray here: the Ray executor runs the same function on Ray Train
(`workers.ray_train`).
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

_RESULT_FILE = "rank0_result.pkl"


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the process group, else from the environment (torchrun's names)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if _initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), local_rank


def device_for_rank() -> torch.device:
    """cuda:LOCAL_RANK (modulo the visible GPUs) when CUDA is available, else cpu."""
    if torch.cuda.is_available():
        local_rank = dist_info()[2]
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_from_env(backend: str | None = None, timeout_s: float = 600.0) -> bool:
    """Initialise the process group from torchrun-style env vars when WORLD_SIZE > 1.

    Returns True when a process group is in place (already, or now). No-op for a single process and when
    the group already exists (Ray Train initialises it). Default backend: nccl when CUDA is available and
    every local rank can have its own GPU (NCCL refuses two ranks on one GPU), else gloo.
    """
    if _initialized():
        return True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    backend = backend or _default_backend(world)
    if backend == "nccl":
        torch.cuda.set_device(device_for_rank())
    dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    return True


def _default_backend(world: int) -> str:
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return "nccl" if torch.cuda.is_available() and local_world <= torch.cuda.device_count() else "gloo"


_STORE_SOCKET: socket.socket | None = None  # rank 0's listening socket of a local launch (the store uses its fd)


def _init_loopback_group(backend: str | None, rank: int, world: int, port: int, timeout_s: float = 600.0) -> None:
    """The process group of a local launch, reachable from this machine only.

    torch's env:// store listens on every interface whatever MASTER_ADDR says; here rank 0 hands the store a
    socket bound to 127.0.0.1:`port` (`master_listen_fd`), and gloo binds its connections to the loopback
    interface (GLOO_SOCKET_IFNAME=lo unless set).
    """
    global _STORE_SOCKET
    backend = backend or _default_backend(world)
    timeout = timedelta(seconds=timeout_s)
    if rank == 0:
        _STORE_SOCKET = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        _STORE_SOCKET.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _STORE_SOCKET.bind(("127.0.0.1", port))
        _STORE_SOCKET.listen(128)
        store = dist.TCPStore("127.0.0.1", port, world, True, timeout, master_listen_fd=_STORE_SOCKET.fileno())
    else:
        store = dist.TCPStore("127.0.0.1", port, world, False, timeout)
    if backend == "gloo" and sys.platform == "linux" and "lo" in {name for _, name in socket.if_nameindex()}:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if backend == "nccl":
        torch.cuda.set_device(device_for_rank())
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (and return it); unchanged without a process group."""
    if _initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Wait for every rank; no-op without a process group."""
    if _initialized() and dist.get_world_size() > 1:
        dist.barrier()


def is_rank0() -> bool:
    """True on rank 0 (and in a single process)."""
    return dist_info()[0] == 0


PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal this process gets when the thread that started it ends (Linux)."""


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send `sig` (SIGKILL) to this process as soon as its parent dies (Linux only).

    For processes that must never outlive the launcher: DDP ranks that would otherwise go on training and
    writing checkpoints after the driver was SIGKILLed. The kernel watches the *thread* that started this
    process, so the launcher must keep that thread alive while the process runs (the launchers here block
    in it until the ranks end). A parent that died before the request cannot be signalled any more: when
    `parent_pid` is given and this process's parent is no longer that process, exit at once. Returns True
    when the signal is armed; False off Linux or where prctl is refused (nothing else changes then).
    """
    if sys.platform != "linux":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(128 + int(sig))  # orphaned before the signal was armed: the launcher is gone
    return armed


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _spawned(index: int, fn: Callable[[Any], Any], arg: Any, world_size: int, port: int, out_dir: str,
             backend: str | None, parent_pid: int | None = None) -> None:
    """Entry point of one spawned rank (torch.multiprocessing passes the index first).

    The rank dies with the launcher (`die_with_parent`): a SIGKILLed driver leaves no rank behind.
    """
    die_with_parent(parent_pid)
    os.environ.update({
        "RANK": str(index), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(index),
        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    })
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        _init_loopback_group(backend, index, world_size, port)
        value = fn(arg)
        if index == 0:
            from manifests.store import atomic_path

            with atomic_path(Path(out_dir) / _RESULT_FILE) as tmp, open(tmp, "wb") as fh:
                pickle.dump(value, fh)
        # Finish together, then leave without running the process group's C++ teardown: gloo's destructors
        # race with the peer closing its connections and abort the process now and then (SIGABRT,
        # "terminate called without an active exception") after all the work is done. Everything this
        # rank owns is written and closed by now, so an immediate exit loses nothing.
        barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    except BaseException:
        # Time-stamped, so the launcher can name the rank that failed first (the others then fail in
        # their collectives with "connection closed by peer").
        (Path(out_dir) / f"error-{index}.txt").write_text(f"{time.time():.6f}\n{traceback.format_exc()}")
        raise
    finally:
        if _initialized():
            dist.destroy_process_group()


def _first_failure(out_dir: str, world_size: int) -> str | None:
    """The traceback of the rank that failed first, naming the others that failed after it."""
    found = []
    for path in Path(out_dir).glob("error-*.txt"):
        stamp, _, text = path.read_text().partition("\n")
        found.append((float(stamp), int(path.stem.split("-")[1]), text))
    if not found:
        return None
    found.sort()
    _, rank, text = found[0]
    others = ", ".join(str(r) for _, r, _ in found[1:])
    tail = f"\n(rank(s) {others} failed after it)" if others else ""
    return f"DDP rank {rank} of {world_size} failed:\n{text}{tail}"


def launch_local(fn: Callable[[Any], Any], arg: Any, world_size: int, backend: str | None = None) -> Any:
    """Run the DDP job `fn(arg)` on `world_size` local processes and return rank 0's return value.

    world_size 1: `fn(arg)` in this process. More: `world_size` spawned processes with RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT set; each joins a process group that listens on
    127.0.0.1 only (`_init_loopback_group`; `fn`'s own `init_from_env()` is then a no-op) and calls `fn(arg)`. `fn` and `arg` must be picklable (a module-level function). If any rank fails the others are
    stopped and RuntimeError carries the failing rank's traceback. On Linux every rank gets SIGKILL when the
    launching process dies (`die_with_parent`); this call blocks in its thread until the ranks end.
    """
    if world_size <= 1:
        return fn(arg)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="distill-ddp-") as out_dir:
        try:
            mp.start_processes(_spawned, args=(fn, arg, world_size, free_port(), out_dir, backend, os.getpid()),
                               nprocs=world_size, join=True, start_method="spawn")
        except mp.ProcessRaisedException as exc:
            first = _first_failure(out_dir, world_size)
            raise RuntimeError(first or f"DDP rank {exc.error_index} of {world_size} failed:\n{exc}") from None
        except mp.ProcessExitedException as exc:
            first = _first_failure(out_dir, world_size)
            died = f"DDP rank {exc.error_index} of {world_size} died: {exc}"
            raise RuntimeError(f"{first}\n{died}" if first else died) from None
        path = Path(out_dir) / _RESULT_FILE
        if not path.exists():
            raise RuntimeError("DDP job finished but rank 0 wrote no result")
        with open(path, "rb") as fh:
            return pickle.load(fh)  # written by our own rank 0 just now
