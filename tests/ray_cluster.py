"""A private local Ray head for tests: start it, submit jobs to it, stop exactly its own processes.

Other sessions may run their own Ray clusters on the same machine, so this helper never uses
`ray stop` (which stops *every* Ray cluster of the user). Instead:

- every port the head uses is a free port picked here (GCS, dashboard, dashboard agent, runtime-env
  agent, client server, node/object manager, metrics), so two heads never collide on a default port;
- the head runs as `ray start --head --block` in a new session (its own process group) under a short
  private `--temp-dir`, with a unique marker variable (`DISTILL_TEST_RAY_HEAD=<token>`) in its
  environment. Every process the head starts inherits that variable: GCS, raylet, dashboard, agents,
  workers, the job supervisor actors and the job drivers (which Ray puts in sessions of their own);
- `stop()` collects the head's processes: the descendants of the `ray start` process, plus any process
  whose /proc/<pid>/environ carries the marker or whose command line names the temp dir (this catches
  processes that were re-parented to init when a parent died). It sends SIGTERM to `ray start` first
  (with `--block` that tears the node down cleanly, and at once: the head runs with
  `RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0` instead of draining for up to 30 s), then SIGTERM and
  finally SIGKILL to whatever of that set is still alive, checking each pid's start time so a reused
  pid is never signalled.

The `ray start` process also gets PR_SET_PDEATHSIG=SIGTERM, so a head outlives a killed pytest only
until the kernel notices, and is torn down with it.

Authentication: Ray 2.60 turns token authentication on for `ray start` whenever it finds a token (for
instance a ~/.ray/auth_token left by any earlier `ray.init()` of the same user), so the head's behaviour
would depend on shared state. By default the head here runs with `RAY_AUTH_MODE=token` and a private
random `RAY_AUTH_TOKEN`, which the CLI calls and HTTP requests below send along; `auth=False` gives
`RAY_AUTH_MODE=disabled` instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARKER = "DISTILL_TEST_RAY_HEAD"
REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the interpreter running the tests (the project's venv)


def ray_binary() -> Path:
    """The `ray` CLI beside the test interpreter (the venv's), else the one on PATH."""
    local = VENV_BIN / "ray"
    if local.exists():
        return local
    found = shutil.which("ray")
    if not found:
        raise FileNotFoundError("no `ray` executable beside the interpreter or on PATH")
    return Path(found)


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------------------------- /proc


def _proc_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (field 22 of /proc/<pid>/stat), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _proc_table() -> dict[int, int]:
    """pid -> parent pid for every process visible in /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        table[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
    return table


def _proc_has(pid: int, needle: bytes, what: str) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/{what}").read_bytes()
    except OSError:  # gone, or another user's process
        return False


def _descendants(roots: set[int], table: dict[int, int]) -> set[int]:
    out = set(roots)
    grew = True
    while grew:
        grew = False
        for pid, ppid in table.items():
            if ppid in out and pid not in out:
                out.add(pid)
                grew = True
    return out


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# --------------------------------------------------------------------------------------------- the head


@dataclass
class LocalRayHead:
    """A running `ray start --head --block` owned by this process."""

    proc: subprocess.Popen
    temp_dir: Path
    ports: dict[str, int]
    token: str
    env: dict[str, str] = field(repr=False, default_factory=dict)
    log_path: Path | None = None
    auth_token: str | None = field(repr=False, default=None)

    @property
    def client_env(self) -> dict[str, str]:
        """Environment for CLI calls against this head (the venv's bin first; no marker, no RAY_*)."""
        return {k: v for k, v in self.env.items() if k != MARKER}

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports['port']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"

    # -- processes

    def pids(self) -> set[int]:
        """Every live process that belongs to this head (see the module docstring)."""
        table = _proc_table()
        marker = f"{MARKER}={self.token}".encode()
        temp = str(self.temp_dir).encode()
        roots = {self.proc.pid} if self.proc.pid in table else set()
        for pid in table:
            if pid != os.getpid() and (_proc_has(pid, marker, "environ") or _proc_has(pid, temp, "cmdline")):
                roots.add(pid)
        return _descendants(roots, table) - {os.getpid()}

    def stop(self, timeout: float = 30.0, remove_temp_dir: bool = True) -> set[int]:
        """Stop this head's processes (never anyone else's); returns the pids that were signalled."""
        victims = {pid: _proc_start_time(pid) for pid in self.pids()}
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` tears its node down
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            alive = {p: t for p, t in victims.items() if t is not None and _proc_start_time(p) == t}
            for pid in alive:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while alive and time.monotonic() < deadline:
                alive = {p: t for p, t in alive.items() if _proc_start_time(p) == t}
                time.sleep(0.2)
            if not alive:
                break
        if remove_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return set(victims)

    # -- jobs

    def submit(
        self, entrypoint: Sequence[str], working_dir: Path | None = REPO, runtime_env: dict[str, Any] | None = None,
        submission_id: str | None = None, no_wait: bool = False, timeout: float = 300.0,
    ) -> subprocess.CompletedProcess[str]:
        """`ray job submit` to this head's dashboard; waits for the job unless `no_wait`.

        `ray job submit` exits 1 when a waited-for job fails.
        """
        cmd = [str(ray_binary()), "job", "submit", "--address", self.dashboard_url]
        if working_dir is not None:
            cmd += ["--working-dir", str(working_dir)]
        if runtime_env:
            cmd += ["--runtime-env-json", json.dumps(runtime_env)]
        if submission_id:
            cmd += ["--submission-id", submission_id]
        if no_wait:
            cmd.append("--no-wait")
        cmd += ["--", *entrypoint]
        return subprocess.run(cmd, env=self.client_env, capture_output=True, text=True, timeout=timeout, cwd=REPO)

    def get_json(self, path: str, timeout: float = 10.0) -> Any:
        """GET `path` from the dashboard's REST API (with the token when auth is on)."""
        return json.loads(_http_get(f"{self.dashboard_url}{path}", self.auth_token, timeout))

    def job_status(self, submission_id: str) -> str:
        """The job's status name (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) from the REST API."""
        return self.get_json(f"/api/jobs/{submission_id}")["status"]

    def wait_job(self, submission_id: str, timeout: float = 300.0) -> str:
        """Poll until the job reaches a terminal state; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.job_status(submission_id)
            if status in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
                return status
            time.sleep(1.0)

    def stop_job(self, submission_id: str) -> bool:
        """`ray job stop`, through the job REST API (what the CLI calls; without its seconds of start-up)."""
        url = f"{self.dashboard_url}/api/jobs/{submission_id}/stop"
        request = urllib.request.Request(url, data=b"", method="POST",
                                         headers={"Authorization": f"Bearer {self.auth_token}"} if self.auth_token else {})
        with urllib.request.urlopen(request, timeout=30) as resp:
            return bool(json.loads(resp.read()).get("stopped"))

    def job_logs(self, submission_id: str) -> str:
        cmd = [str(ray_binary()), "job", "logs", "--address", self.dashboard_url, submission_id]
        return subprocess.run(cmd, env=self.client_env, capture_output=True, text=True, timeout=120, cwd=REPO).stdout


def _http_get(url: str, token: str | None, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return resp.read()


def _dashboard_ready(url: str, token: str | None) -> bool:
    """The dashboard answers and its job API lists jobs."""
    try:
        _http_get(f"{url}/api/version", token, 2.0)
        json.loads(_http_get(f"{url}/api/jobs/", token, 5.0))
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def start_head(
    num_cpus: int = 2, timeout: float = 120.0, extra_env: dict[str, str] | None = None, auth: bool = True,
) -> LocalRayHead:
    """Start a private head on 127.0.0.1 (dashboard included) and wait until it accepts jobs.

    PATH starts with the test interpreter's bin folder, so `python` in a job entrypoint is the venv's.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="rayt-", dir="/tmp"))  # short: unix socket paths are limited
    names = ["port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port",
             "metrics-export-port"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    token = uuid.uuid4().hex
    auth_token = uuid.uuid4().hex + uuid.uuid4().hex if auth else None
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: on SIGTERM, `ray start --block` tears the node down at once.
    # By default it first drains the node for up to 30 s, and a node still holding a worker lease (for
    # instance the detached `_AutoscalingCoordinatorActor` a Ray Train job leaves behind) waits all of it.
    env.update({"PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", MARKER: token,
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0",
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": auth_token} if auth_token else {"RAY_AUTH_MODE": "disabled"})
    env.update(extra_env or {})
    cmd = [str(ray_binary()), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--num-cpus", str(num_cpus), "--num-gpus", "0",
           "--include-dashboard", "true", "--temp-dir", str(temp_dir), "--disable-usage-stats",
           "--object-store-memory", str(256 << 20)]
    for name, port in ports.items():
        cmd += [f"--{name}", str(port)]
    log_path = temp_dir / "ray-start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_set_pdeathsig if sys.platform == "linux" else None)
    head = LocalRayHead(proc=proc, temp_dir=temp_dir, ports=ports, token=token, env=env, log_path=log_path,
                        auth_token=auth_token)
    deadline = time.monotonic() + timeout
    while not _dashboard_ready(head.dashboard_url, auth_token):
        if proc.poll() is not None or time.monotonic() > deadline:
            text = log_path.read_text(errors="replace")[-4000:]
            head.stop(remove_temp_dir=False)
            raise RuntimeError(f"ray head did not come up ({shlex.join(cmd)}):\n{text}")
        time.sleep(0.5)
    return head


@contextlib.contextmanager
def ray_head(**kwargs: Any) -> Iterator[LocalRayHead]:
    """`with ray_head() as head:` start a private head and always stop it."""
    head = start_head(**kwargs)
    try:
        yield head
    finally:
        head.stop()
