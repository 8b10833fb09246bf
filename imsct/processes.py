"""Local server processes: a free loopback port, a process in its own process group with its output
in a log file, waiting for a health URL, stopping the whole group.

Used by :mod:`imsct.orthanc` (the local Orthanc of ``apps/imsct_label/serve.py --orthanc``) and by the
tests' server starters (``tests/support/servers.py``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on now (it may be taken before it is used: start in a retry loop)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    """Whether something already listens on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def wait_for(url: str, proc: subprocess.Popen, timeout: float, headers: dict | None = None) -> bool:
    """Poll ``url`` (with ``headers``) until it answers 2xx (True), the process exits or ``timeout`` s pass (False)."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(url, timeout=5, headers=headers).ok:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.3)
    return False


def stop_process(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    """Stop a process started with ``start_new_session=True`` (SIGTERM to its whole process group, so
    its children go too; SIGKILL after ``timeout`` s)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux), so that a server started by a
    process that is killed (SIGKILL: no clean-up runs) does not outlive it."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass


def start_logged(cmd: list[str], log_path: Path, health_url: str, timeout: float, cwd: Path,
                 env: dict | None = None, headers: dict | None = None,
                 die_with_parent: bool = False) -> tuple[subprocess.Popen | None, str]:
    """Start ``cmd`` in its own process group, output to ``log_path``, and wait until ``health_url``
    answers (requested with ``headers``). Returns ``(process, "")`` when it is up; ``(None, its log)``
    when it exited or timed out (it is stopped then). ``die_with_parent``: the process gets SIGTERM
    when this process dies (Linux)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent if die_with_parent else None)
    if wait_for(health_url, proc, timeout, headers):
        return proc, ""
    text = Path(log_path).read_text(errors="replace")
    stop_process(proc)
    return None, text
