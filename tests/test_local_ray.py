"""The Ray that `wrnsweep launch` starts for itself listens on the loopback interface only.

A real sweep runs; while its first trial trains, the listening TCP sockets of
the driver and of every process under it (GCS, raylet, dashboard and runtime-env
agents, workers) are read from /proc and must all be on 127.0.0.1 / ::1. Only
processes this test started are looked at, and only they are stopped.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TWO_ARCH = REPO / "tests" / "sweeps" / "two_arch.yaml"
WRNSWEEP = str(Path(sys.executable).with_name("wrnsweep"))
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp{,6}

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")]


def descendants(pid: int) -> set[int]:
    """Every process under ``pid`` (children of children too), from /proc/*/stat."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])  # field 4: ppid
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        frontier -= found
        found |= frontier
    return found


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


def test_local_sweep_listens_on_loopback_only(tmp_path: Path) -> None:
    out = tmp_path / "stdout.txt"
    with out.open("w") as stdout:
        driver = subprocess.Popen(
            [WRNSWEEP, "launch", str(TWO_ARCH), "--storage", str(tmp_path / "runs"),
             "--num-samples", "1"],
            cwd=tmp_path, stdout=stdout, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
            env={**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1",
                 "XDG_CONFIG_HOME": str(tmp_path / "config")})
    ours: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        # A trial's first epoch: GCS, raylet, agents and a worker are all up by then.
        while " epoch 1/" not in out.read_text():
            assert driver.poll() is None, "the sweep ended early:\n" + out.read_text()[-3000:]
            assert time.monotonic() < deadline, "no epoch within 300 s"
            time.sleep(0.5)
        ours = {driver.pid} | descendants(driver.pid)
        sockets = listening_sockets(ours)
    finally:
        _stop(driver, ours)

    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # Ray's own servers were seen
    exposed = [s for s in sockets if not is_loopback(s[1])]
    assert not exposed, f"listening beyond the loopback interface: {exposed}"


def _started(pid: int) -> str | None:
    """A process's start time (clock ticks since boot), None once it is gone or a zombie.

    With the pid it names one process: a pid reused by someone else's process
    has another start time and is left alone.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]  # state; field 22: starttime


def _stop(driver: subprocess.Popen, ours: set[int]) -> None:
    """The driver's process group, then any process it started that outlived it."""
    started = {pid: _started(pid) for pid in ours | descendants(driver.pid)}
    if driver.poll() is None:
        os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=60)
    deadline = time.monotonic() + 60
    alive = list(started)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid, when in started.items()
                 if when is not None and _started(pid) == when]
        time.sleep(0.5)
    for pid in alive:  # Ray processes that left the group: still this test's own
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
