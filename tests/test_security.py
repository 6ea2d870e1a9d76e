"""The private local Ray cluster the executor starts: loopback only, a private auth token, gone with the driver.

Each test runs a real driver in a subprocess: a `RayExecutor` with its own cluster runs two units that block
(so two actors live). Every process of that run carries a marker in its environment (Ray hands the driver's
environment down to GCS, raylet, agents and workers), which is how the test finds them in /proc; their
listening sockets come from /proc/<pid>/fd and /proc/net/tcp{,6}.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pipeline.run.base import RunContext, Stage, Unit, UnitResult

ROOT = Path(__file__).resolve().parents[1]
MARK = "DISTILL_TEST_SECURITY"
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "DISTILL_RAY_CLUSTER")

pytestmark = [pytest.mark.ray, pytest.mark.skipif(sys.platform != "linux", reason="reads Linux /proc")]


# ----------------------------------------------------------------------------- the driver's stage

class BlockWorker:
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def run(self, unit: Unit) -> UnitResult:
        Path(self.folder, f"actor-{os.getpid()}").write_text(unit.key)
        time.sleep(600)  # the test kills the driver long before
        return UnitResult()

    def close(self) -> None:
        pass


class BlockStage(Stage):
    name = "block"
    distributed = True

    def open_worker(self, ctx: RunContext) -> BlockWorker:
        return BlockWorker(str(ctx.run_dir))


BLOCK = BlockStage()  # actors find it as "tests.test_security:BLOCK"


def run_driver(folder: str) -> None:
    """The driver process: a Ray executor with its own cluster runs two blocking units."""
    import ray

    from pipeline.commands.recipes import load_config
    from workers.ray_executor import RayExecutor

    before = {k: os.environ.get(k) for k in AUTH_VARS}
    cfg = load_config("demo", overrides=["executor.kind=ray", "executor.num_cpus=2", "executor.num_workers=2",
                                         "executor.cpus_per_worker=1"])
    executor = RayExecutor(cfg)
    ctx = RunContext(run_dir=Path(folder), config=cfg, run_id="security", hashes={"block": "h"})
    try:
        executor.connect()
        Path(folder, "gcs").write_text(ray.get_runtime_context().gcs_address)
        executor.run_units(BLOCK, ctx, [Unit(f"u{i}") for i in range(2)], lambda outcome: None)
    finally:
        executor.close()
        after = {k: os.environ.get(k) for k in AUTH_VARS}
        Path(folder, "closed.json").write_text(json.dumps({"before": before, "after": after}))


# ----------------------------------------------------------------------------------- /proc helpers

def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _marked(token: str) -> set[int]:
    """Live processes whose environment holds this test's marker."""
    needle = f"{MARK}={token}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if needle in Path(f"/proc/{entry}/environ").read_bytes() and _alive(int(entry)):
                    found.add(int(entry))
            except OSError:
                pass
    return found


def _address(hex_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_ip)  # /proc/net/tcp*: 32-bit words in host (little-endian) order
    return ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))


def _listening(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket the processes hold."""
    owner: dict[int, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owner[int(link[8:-1])] = pid
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[9]) in owner:  # 0A = LISTEN
                hex_ip, hex_port = fields[1].split(":")
                found.append((owner[int(fields[9])], str(_address(hex_ip)), int(hex_port, 16)))
    return found


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


# -------------------------------------------------------------------------------------- the runs

class Driver:
    """The driver subprocess and the marker its whole process tree carries."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.token = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
        env.update({MARK: self.token, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"})
        code = f"from tests.test_security import run_driver; run_driver({str(folder)!r})"
        self.log = open(folder / "driver.log", "wb")  # closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def wait_running(self, timeout: float = 240.0) -> None:
        """Until both actors run their unit."""
        deadline = time.monotonic() + timeout
        while len(list(self.folder.glob("actor-*"))) < 2:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the driver did not start its actors:\n" + self.output())
            time.sleep(0.25)

    def output(self) -> str:
        return (self.folder / "driver.log").read_text(errors="replace")[-4000:]

    def gone_after(self, sig: int, limit: float) -> tuple[float, dict[int, str]]:
        """Send `sig` to the driver; seconds until no marked process is left (or `limit`), and the leftovers."""
        start = time.monotonic()
        self.proc.send_signal(sig)
        while time.monotonic() - start < limit:
            left = _marked(self.token)
            if not left:
                return time.monotonic() - start, {}
            time.sleep(0.1)
        return time.monotonic() - start, {pid: _cmdline(pid)[:120] for pid in _marked(self.token)}

    def stop(self) -> None:
        """Kill whatever is left (never anything without this run's marker)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        for pid in _marked(self.token):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.log.close()


def _gcs_call(address: str, token: str | None) -> str:
    """A GCS request with (or without) a bearer token: 'OK' or the gRPC status name."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), metadata=metadata, timeout=20)
        except grpc.RpcError as exc:
            return exc.code().name
    return "OK"


def test_private_cluster_binds_loopback_requires_its_own_token_and_stops_on_sigterm(tmp_path):
    driver = Driver(tmp_path)
    try:
        driver.wait_running()
        pids = _marked(driver.token) | {driver.proc.pid}
        names = {pid: _cmdline(pid) for pid in pids}
        sockets = _listening(pids)
        assert any("gcs_server" in names.get(pid, "") for pid, _, _ in sockets), sockets  # it does see Ray's
        exposed = [(addr, port, names.get(pid, "?")[:80]) for pid, addr, port in sockets if not _is_loopback(addr)]
        assert exposed == [], f"{len(exposed)} of {len(sockets)} listening sockets are not on loopback"

        # token authentication with a private token, the same in every process of the cluster
        raylet = next(pid for pid, cmd in names.items() if "/raylet " in f"{cmd} " or cmd.endswith("raylet"))
        env = _environ(raylet)
        assert env.get("RAY_AUTH_MODE") == "token" and len(env.get("RAY_AUTH_TOKEN", "")) >= 32
        token = env["RAY_AUTH_TOKEN"]
        assert {_environ(pid).get("RAY_AUTH_TOKEN") for pid in pids - {driver.proc.pid}} <= {token, None}
        home = Path.home() / ".ray" / "auth_token"
        assert not home.exists() or home.read_text().strip() != token  # not the user's shared token
        gcs = (tmp_path / "gcs").read_text()
        assert gcs.startswith("127.0.0.1:")
        assert _gcs_call(gcs, None) == "UNAUTHENTICATED"
        assert _gcs_call(gcs, "0" * 64) == "UNAUTHENTICATED"
        if home.exists():
            assert _gcs_call(gcs, home.read_text().strip()) == "UNAUTHENTICATED"
        assert _gcs_call(gcs, token) == "OK"

        seconds, left = driver.gone_after(signal.SIGTERM, limit=20.0)
        assert left == {}, f"still running {seconds:.0f} s after SIGTERM: {left}"
        closed = json.loads((tmp_path / "closed.json").read_text())  # the executor closed on SIGTERM
        assert closed["after"] == closed["before"]  # and gave the driver its auth settings back
    finally:
        driver.stop()


def test_a_sigkilled_driver_leaves_no_ray_process_behind(tmp_path):
    driver = Driver(tmp_path)
    try:
        driver.wait_running()
        # let the per-node agents come up too: they are the ones that used to linger
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
                any(any(name in _cmdline(pid) for name in names) for pid in _marked(driver.token))
                for names in (("dashboard/agent.py", "DashboardAgent"),  # the script, or its title once
                              ("runtime_env/agent/main.py", "RuntimeEnvAgent"))):  # retitled
            time.sleep(0.5)
        before = {pid: _cmdline(pid)[:80] for pid in _marked(driver.token)}
        seconds, left = driver.gone_after(signal.SIGKILL, limit=20.0)
        wardens = {p: _cmdline(p)[:30] for p in before if "-S -c" in _cmdline(p)}  # alive, if it still runs
        states = {p: (_stat(p) or ["gone"])[:2] for p in left}  # state and parent of each leftover
        assert left == {}, (f"still running {seconds:.0f} s after the driver was SIGKILLed: {left} (state, ppid: "
                            f"{states}; warden alive: {wardens}) of {before}")
    finally:
        driver.stop()
