"""Running engine services as real child processes (the demo and the benchmarks do)."""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.request


def http_ready(url: str) -> bool:
    """True when ``url`` answers 200 (a readiness probe)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the process group started with ``start_new_session``; SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
