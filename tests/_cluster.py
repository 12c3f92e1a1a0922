"""A real multi-node Ray cluster on this machine (`ray start --head` + `ray start --address`).

Every node binds to 127.0.0.1. Nodes are told apart by their node-manager port,
which appears on their raylet's command line, so a test can kill exactly one
node's raylet by pid. Every node (the head too) has a temp dir of its own, and
every process that `ray start` runs inherits a marker in its environment, so
`stop()` ends this cluster's processes (the marked ones and their descendants,
e.g. Ray's workers and agents, which rewrite their process titles) and leaves any
other Ray session on the machine alone, where `ray stop --force` would end them all.
Also here, as they read /proc the same way: the listening sockets of a process tree.
"""

from __future__ import annotations

import contextlib
import ipaddress
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
import uuid
from collections.abc import Callable
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", **extra}
    out.pop("RAY_ADDRESS", None)
    return out


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a real condition (not a fixed sleep) until it holds or time runs out."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def pids_with(*needles: str, python_only: bool = False) -> list[int]:
    """Processes whose command line contains every needle (read from /proc).

    ``python_only`` skips wrappers such as the ``/bin/sh -c`` that runs a job's
    entrypoint: only processes whose program is a Python interpreter count.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        cmdline = b" ".join(argv).decode(errors="replace")
        if python_only and not Path(argv[0].decode(errors="replace")).name.startswith("python"):
            continue
        if all(n in cmdline for n in needles):
            found.append(int(entry.name))
    return found


MARKER = "WRNSWEEP_TEST_CLUSTER"


def _status(pid: int, field: str) -> str | None:
    """One field of /proc/PID/status (None once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _parent(pid: int) -> int | None:
    ppid = _status(pid, "PPid")
    return int(ppid) if ppid else None


def _alive(pid: int) -> bool:
    state = _status(pid, "State")
    return state is not None and not state.startswith(("Z", "X"))  # zombies have ended


def cluster_pids(marker: str) -> set[int]:
    """Processes that inherited ``MARKER=marker``, and all their descendants.

    Descendants are added by parent pid: a process that sets its title (Ray's
    ``ray::IDLE`` workers, its agents, the dashboard's modules) may overwrite the
    environment block /proc shows, so the marker alone misses them.
    """
    needle = f"{MARKER}={marker}".encode()
    parents: dict[int, int | None] = {}
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        parents[pid] = _parent(pid)
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.add(pid)
        except OSError:
            continue  # ended meanwhile, or another user's
    return _with_descendants(found, parents)


def _with_descendants(roots: set[int], parents: dict[int, int | None]) -> set[int]:
    """``roots`` and every process under them, by parent pid."""
    found = set(roots)
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return found


def _agent_port(port: int | None) -> str:
    """``ray start``'s option for the node's dashboard agent HTTP port, a free one by default.

    Every Ray node's agent listens on 52365 unless told otherwise (Ray 2.60,
    ``ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT``), including the
    local Ray of a test in the other pytest worker. A node started while that
    port is taken logs "failed to bind" in ``dashboard_agent.log`` and runs its agent
    without the HTTP service, and a head in that state answers every job submission
    "No available agent to submit job, please try again later" (reproduced by
    holding the port: ``test_cluster.py``'s agent-port test).
    """
    return f"--dashboard-agent-listen-port={free_port() if port is None else port}"


class LocalCluster:
    def __init__(self, workdir: Path, **node_env: str) -> None:
        self.workdir = workdir
        self.marker = uuid.uuid4().hex
        # Ray 2.60 heads require a token; `ray start --address` only sends one in token
        # mode (the token itself is ~/.ray/auth_token, made by the first head).
        self.env = env(RAY_AUTH_MODE="token", **{MARKER: self.marker}, **node_env)
        self.port = free_port()
        self.dashboard_port = free_port()
        self.worker_ports: list[int] = []
        self.temp_dirs: list[str] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def jobs_address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ray(self, *args: str) -> None:
        result = subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True,
                                env=self.env, cwd=self.workdir, timeout=180)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    def _temp_dir(self) -> str:
        # Short, under /tmp: Ray's unix socket paths must stay below 108 characters.
        temp_dir = tempfile.mkdtemp(prefix="rayn", dir="/tmp")
        self.temp_dirs.append(temp_dir)
        return temp_dir

    def start_head(self, num_cpus: int, *, agent_port: int | None = None) -> LocalCluster:
        """Start the head node. ``agent_port``: its dashboard agent's HTTP port (a free
        one when None, see :func:`_agent_port`)."""
        self._ray("start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                  f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=true",
                  f"--dashboard-port={self.dashboard_port}", "--disable-usage-stats",
                  _agent_port(agent_port), f"--temp-dir={self._temp_dir()}")
        return self

    def add_worker(self, num_cpus: int, *, hide: Path | None = None) -> int:
        """Start a worker node; its node-manager port identifies it.

        ``hide``: the node runs in its own mount namespace with an empty tmpfs
        over that folder, like a machine that does not mount the shared disk.
        """
        port = free_port()
        # A temp dir of its own, as on a separate machine: two nodes sharing one would
        # unpack job working_dirs into the same folder, deleting each other's cwd.
        temp_dir = self._temp_dir()
        args = ["start", f"--address={self.address}", "--node-ip-address=127.0.0.1",
                f"--num-cpus={num_cpus}", "--num-gpus=0", f"--node-manager-port={port}",
                f"--temp-dir={temp_dir}", "--disable-usage-stats", _agent_port(None)]
        if hide is None:
            self._ray(*args)
        else:
            hide.mkdir(parents=True, exist_ok=True)
            script = (f"mount -t tmpfs tmpfs {shlex.quote(str(hide))} && "
                      f"exec {shlex.join([str(BIN / 'ray'), *args])}")
            result = subprocess.run(["unshare", "--mount", "--propagation", "private",
                                     "sh", "-c", script], capture_output=True, text=True,
                                    env=self.env, cwd=self.workdir, timeout=180)
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        self.worker_ports.append(port)
        return port

    def kill_node(self, node_manager_port: int) -> int:
        """SIGKILL the raylet of one node (its workers die with it)."""
        pids = pids_with("raylet", f"--node_manager_port={node_manager_port}")
        assert len(pids) == 1, f"expected one raylet on port {node_manager_port}, got {pids}"
        os.kill(pids[0], signal.SIGKILL)
        return pids[0]

    def stop(self) -> None:
        """SIGKILL this cluster's processes (what `ray stop --force` does, to every Ray)."""
        for _ in range(10):  # a process may fork while the others are being killed
            pids = cluster_pids(self.marker)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            wait_for(lambda pids=pids: not any(_alive(p) for p in pids), 30,
                     "the cluster's processes to end")
        for folder in self.temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)


def trial_progress(runs_file: Path) -> dict[str, int]:
    """trial id -> last epoch logged, from the tracker's map (empty while absent)."""
    try:
        runs = json.loads(runs_file.read_text())
    except (OSError, ValueError):
        return {}
    return {trial: entry.get("last_epoch", 0) for trial, entry in runs.items()}


def can_unshare_mounts() -> bool:
    """Private mount namespaces need root (or user namespaces) and unshare(1)."""
    try:
        return subprocess.run(["unshare", "--mount", "true"], capture_output=True,
                              timeout=30).returncode == 0
    except OSError:
        return False


# Listening sockets of a process tree, read from /proc: a sweep's Ray must listen on
# the loopback interface only (tests/test_sweep_e2e.py, the SIGKILL test).
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp{,6}


def descendants(pid: int) -> set[int]:
    """Every process under ``pid`` (children of children too), from /proc."""
    parents = {int(e.name): _parent(int(e.name)) for e in Path("/proc").iterdir()
               if e.name.isdigit()}
    return _with_descendants({pid}, parents) - {pid}


def listening_sockets(pids: set[int]) -> list[tuple[str, str, int]]:
    """``(process name, address, port)`` of each listening TCP socket the processes hold."""
    owner: dict[str, int] = {}  # socket inode -> pid
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[len("socket:["):-1]] = pid
    found = []
    for family, table in ((socket.AF_INET, "tcp"), (socket.AF_INET6, "tcp6")):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != LISTEN or fields[9] not in owner:
                continue
            hex_ip, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_ip)
            # The kernel prints each 32-bit word of the address in host (little-endian) order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            try:
                name = Path(f"/proc/{owner[fields[9]]}/comm").read_text().strip()
            except OSError:
                name = "?"
            found.append((name, socket.inet_ntop(family, raw), int(hex_port, 16)))
    return sorted(found)


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)
