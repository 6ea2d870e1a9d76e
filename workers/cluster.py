"""Starting or joining a Ray cluster (shared by the Ray executor and the Ray Train launcher).

A private local cluster (no `executor.address`, not inside a Ray job) is locked down:

- every component binds to 127.0.0.1: the node address is loopback, so GCS, raylet, object manager,
  dashboard agent, runtime-env agent, metrics and every worker's gRPC server listen on loopback only,
  and no dashboard runs (`include_dashboard=False`);
- token authentication is on with a private random token (`RAY_AUTH_MODE=token`, `RAY_AUTH_TOKEN`), never
  the user's ~/.ray/auth_token, so whether it is on does not depend on that file;
- it is shut down with the driver: by `disconnect_ray` (the executor's `close`) or Ray's exit hook on a
  normal exit; on SIGTERM, which raises SystemExit in the driver's main thread so that its `finally`
  blocks close the executor (Ray's own crash handler would otherwise end the process on the spot); and, on
  Linux, by a warden process that outlives a SIGKILLed driver just long enough to stop every process of
  the cluster (Ray's own agents linger about a minute otherwise, trying to report the raylet's death to the
  GCS that died with it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import ray

from pipeline.config import ExecutorConfig
from workers.placement import in_ray_job

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
MARKER_ENV = "DISTILL_RAY_CLUSTER"
"""Set (to a random id) in the environment of every process of a private cluster; the warden stops those."""

# The warden: stdlib only, started with `python -S -c`. While the driver lives it rescans /proc every
# second and remembers the cluster's processes: those whose environment holds the cluster's marker, and
# every descendant of one. The descendants matter: Ray's agents retitle themselves with setproctitle,
# which can overwrite the environment /proc shows, so the marker alone misses them now and then; and once
# the raylet is dead they are re-parented, so they must be known before. When the driver is gone (its pid
# has a new start time or none) or closes the pipe (a deliberate shutdown), it stops every remembered
# process still alive, plus any marked one: SIGTERM, then SIGKILL every half second for whatever is left (for
# up to 30 s: a process stuck in the kernel dies late). A pid's start time is checked before each signal, so
# a reused pid is never hit.
_WARDEN = r"""
import os, select, signal, sys, time
marker, driver, me = sys.argv[1].encode(), int(sys.argv[2]), os.getpid()
def stat(pid):
    try:
        s = open("/proc/%d/stat" % pid, "rb").read()
    except OSError:
        return None, None
    fields = s[s.rindex(b")") + 2:].split()
    return (None if fields[0] == b"Z" else fields[19]), int(fields[1])
def started(pid):
    return stat(pid)[0]
has_marker = {}
def holds_marker(pid, t):
    if (pid, t) not in has_marker:
        try:
            has_marker[(pid, t)] = marker in open("/proc/%d/environ" % pid, "rb").read()
        except OSError:
            has_marker[(pid, t)] = False
    return has_marker[(pid, t)]
known = {}
def scan():
    procs = {}
    for e in os.listdir("/proc"):
        if e.isdigit() and int(e) not in (me, driver):
            t, parent = stat(int(e))
            if t is not None:
                procs[int(e)] = (t, parent)
    for pid, t in list(known.items()):
        if procs.get(pid, (None,))[0] != t:
            del known[pid]
    grew = True
    while grew:
        grew = False
        for pid, (t, parent) in procs.items():
            if pid not in known and (parent in known or holds_marker(pid, t)):
                known[pid] = t
                grew = True
    return dict(known)
signal.signal(signal.SIGINT, signal.SIG_IGN)
born, last = started(driver), 0.0
while born is not None and started(driver) == born:
    if time.monotonic() - last >= 1.0:
        scan()
        last = time.monotonic()
    ready = select.select([0], [], [], 0.25)[0]
    if ready and not os.read(0, 4096):
        break
deadline = time.monotonic() + 30.0
sig, grace = signal.SIGTERM, 2.0
while time.monotonic() < deadline:
    victims = scan()
    if not victims:
        break
    for pid, t in victims.items():
        if started(pid) == t:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
    end = time.monotonic() + grace
    while time.monotonic() < end and any(started(p) == t for p, t in victims.items()):
        time.sleep(0.05)
    sig, grace = signal.SIGKILL, 0.5  # then SIGKILL, again and again, for whatever is still alive
"""

@dataclass
class _Private:
    """What starting a private cluster changed in this process, to undo at shutdown."""

    saved_env: dict[str, str | None] = field(default_factory=dict)
    warden: subprocess.Popen | None = None
    sigterm: object = None  # the SIGTERM handler before the cluster started (None: not replaced)


_private: _Private | None = None


def connect_ray(ray_cfg: ExecutorConfig) -> bool:
    """Make sure this process is connected to Ray; return True when it started a local cluster itself.

    Order: an already initialised Ray (e.g. inside a task or a previous call) is used as it is; then
    `ray_cfg.address`, then RAY_ADDRESS / a Ray job environment (address "auto"); otherwise a new private
    local cluster (`start_private_cluster`: loopback only, private token, no dashboard, `address="local"`
    so a cluster started elsewhere on this machine with `ray start` is never joined by accident). Release
    it with `disconnect_ray(started)`.

    No runtime_env is passed: a local cluster's workers inherit this process's environment (venv,
    PYTHONPATH, cwd on sys.path), and a job's driver already carries the job's runtime_env (working_dir
    from `ray job submit --working-dir`), which a new one would replace. Worker logs go to the driver.
    """
    if ray.is_initialized():
        return False
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS", "") or ("auto" if in_ray_job() else "")
    if address:
        # Joining: the job's runtime_env (working_dir, env vars) is inherited; never start a nested cluster.
        log.info("ray: joining the cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return False
    start_private_cluster(ray_cfg)
    log.info("ray: started a private local cluster (%s)", describe_cluster())
    return True


def start_private_cluster(ray_cfg: ExecutorConfig) -> None:
    """`ray.init` a new local cluster bound to 127.0.0.1 with a private auth token (see the module doc)."""
    global _private
    private = _Private()
    private.saved_env = _set_env({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                                  "RAY_AUTH_TOKEN_PATH": None, MARKER_ENV: secrets.token_hex(16)})
    try:
        _reload_auth_settings()
        private.warden = _start_warden(os.environ[MARKER_ENV])
        main_thread = threading.current_thread() is threading.main_thread()
        private.sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
        with _loopback_node_address():
            ray.init(
                address="local",  # never attach silently to a cluster started elsewhere with `ray start`
                _node_ip_address=LOOPBACK,
                num_cpus=ray_cfg.num_cpus or None,
                num_gpus=None if ray_cfg.num_gpus < 0 else ray_cfg.num_gpus,
                include_dashboard=False,
                log_to_driver=True,
            )
        if private.sigterm is not None:
            signal.signal(signal.SIGTERM, _exit_on_sigterm)  # after ray.init: it installs its own handlers
    except BaseException:
        _private = private
        _release_private()
        raise
    _private = private


def disconnect_ray(started: bool) -> None:
    """Undo `connect_ray`: shut down the cluster it started (`started`), or leave a joined one alone."""
    if not started:
        return
    if ray.is_initialized():
        ray.shutdown()
    _release_private()


def _release_private() -> None:
    """Restore this process's auth settings and let the warden stop anything of the cluster still alive."""
    global _private
    private, _private = _private, None
    if private is None:
        return
    _set_env(private.saved_env)
    with contextlib.suppress(Exception):
        _reload_auth_settings()
    if private.sigterm is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, private.sigterm)  # type: ignore[arg-type]
    if private.warden is not None:
        with contextlib.suppress(OSError):
            private.warden.stdin.close()  # type: ignore[union-attr]
        try:
            private.warden.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("ray: the cluster's warden (pid %d) is still stopping processes", private.warden.pid)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM while a private cluster runs: leave through SystemExit, so `finally` blocks shut it down."""
    raise SystemExit(128 + signum)


def _set_env(values: dict[str, str | None]) -> dict[str, str | None]:
    """Set (or, for None, remove) environment variables; return their previous values."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return old


def _reload_auth_settings() -> None:
    """Make Ray (already imported) read RAY_AUTH_* again: its config and token are cached per process."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication: nothing cached
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def _loopback_node_address() -> Iterator[None]:
    """Keep `_node_ip_address="127.0.0.1"` as it is during `ray.init`.

    Ray replaces a loopback node address by the machine's routable one (`resolve_ip_for_localhost`) unless
    it runs with clusters disabled (`ray_constants.ENABLE_RAY_CLUSTER`, what RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    sets at import). With the loopback address, Ray's servers listen on 127.0.0.1 instead of every interface.
    """
    from ray._private import ray_constants

    old = getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old


def _start_warden(marker: str) -> subprocess.Popen | None:
    """Start the warden (Linux: it reads /proc) in a session of its own; None elsewhere."""
    if sys.platform != "linux":
        return None
    env = {k: v for k, v in os.environ.items() if k != MARKER_ENV and not k.startswith("RAY_AUTH_")}
    return subprocess.Popen([sys.executable, "-S", "-c", _WARDEN, f"{MARKER_ENV}={marker}", str(os.getpid())],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, start_new_session=True)


def describe_cluster() -> str:
    """Address, CPUs and GPUs of the connected cluster (for log lines)."""
    res = ray.cluster_resources()
    try:
        address = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - only for the log line
        address = "?"
    return f"address {address}, {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"
