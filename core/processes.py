"""Engine services as real child processes, and waiting for a condition: the one supervisor the
demo, the benchmarks and the tests share.

A service is ``python -m shoprank <command> [args]`` in its own process group (so a signal reaches
every thread and child it starts), configured only through its environment, exactly as in
production, with stdout and stderr in one log file.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TypeVar

from core.settings import ROOT

T = TypeVar("T")


def wait_until(probe: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "") -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached within {timeout} s: {what or probe}")
        time.sleep(interval)


def http_ready(url: str) -> bool:
    """True when ``url`` answers 200 (a readiness probe)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds (/proc/<pid>/stat)."""
    return _stat_cpu_s(Path(f"/proc/{pid}/stat").read_text())


def _stat_cpu_s(stat: str) -> float:
    """utime + stime in seconds from a /proc stat line (a process's or a thread's)."""
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pid: int) -> dict[str, float]:
    """utime + stime of a process's live threads in seconds, summed by the name the OS knows each
    by (/proc/<pid>/task/*/comm): librdkafka's threads (rdk:*) as one "librdkafka", Python's as
    "python" unless named (:func:`name_os_thread`). A thread that ended is no longer counted."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended while being read
            continue
        name = "librdkafka" if name.startswith("rdk:") else name
        out[name] = out.get(name, 0.0) + _stat_cpu_s(stat)
    return out


def name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` in the OS as well (``top -H``, /proc/<pid>/task/*/comm, at
    most 15 bytes): Python's thread names are its own. Where prctl is missing, nothing happens."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # 15: PR_SET_NAME


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


class Service:
    """One ``shoprank`` service process (``command``, default the feature worker ``streams``).

    ``log_mode`` "a" appends (tests restart a worker into the same log), "w" starts it anew.
    """

    def __init__(self, env: dict[str, str] | None, log_path: Path, command: str = "streams",
                 args: Sequence[str] = (), log_mode: str = "a") -> None:
        self.name = command
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(log_path, log_mode + "b")  # noqa: SIM115 - closed in stop()/kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shoprank", command, *args],
            env=dict(os.environ) if env is None else env, cwd=ROOT,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check(self) -> None:
        """Raise, with the log's tail, when the process has exited."""
        if not self.alive():
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); {self.log_path}:\n"
                               f"{self.log_tail(15)}")

    def wait_ready(self, url: str, timeout: float = 180.0) -> None:
        """Until ``url`` answers 200; fail at once, naming the log, if the process exits first."""
        def ready() -> bool:
            self.check()
            return http_ready(url)

        wait_until(ready, timeout, 0.3, f"{self.name} ready ({url}); see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final commit."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for a clean shutdown (offsets committed); SIGKILL after ``timeout``."""
        stop_group(self.proc, timeout)
        self._log.close()
        return self.proc.returncode

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
