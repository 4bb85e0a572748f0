"""core.progress: a bar on a terminal; without one, periodic JSON log lines and no redraws."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from structlog.testing import capture_logs
from tqdm import tqdm

from core.progress import LoggedProgress, progress
from core.settings import ROOT


def test_a_terminal_gets_a_bar_anything_else_log_lines() -> None:
    assert isinstance(progress(range(3), tty=True), tqdm)
    assert isinstance(progress(range(3), tty=False), LoggedProgress)
    assert isinstance(progress(range(3), tty=True, enabled=False), LoggedProgress)


def test_log_lines_say_how_far_with_rate_eta_and_postfix() -> None:
    with capture_logs() as logs:
        bar = progress(total=10, desc="publish", unit="ev", tty=False, every_s=0.0)
        for _ in range(4):
            bar.update(1)
        bar.set_postfix(loss="0.1234")
        bar.update(6)
        bar.close()
        bar.close()  # once only
    assert [e["event"] for e in logs] == ["progress"] * 5 + ["progress_done"]
    assert [e["done"] for e in logs] == [1, 2, 3, 4, 10, 10]
    assert logs[3]["percent"] == 40.0 and logs[3]["total"] == 10 and logs[3]["task"] == "publish"
    assert "eta_s" in logs[3] and "eta_s" not in logs[-1]
    assert logs[-1]["loss"] == "0.1234" and logs[-1]["unit"] == "ev"


def test_lines_are_periodic_not_per_step() -> None:
    with capture_logs() as logs:
        items = list(progress(range(10_000), desc="embedding", tty=False, every_s=3600.0))
    assert items == list(range(10_000))
    assert [e["event"] for e in logs] == ["progress_done"]  # nothing due within the hour, one at the end
    assert logs[0]["done"] == 10_000 and logs[0]["total"] == 10_000


def test_disabled_is_silent_and_a_break_still_closes() -> None:
    with capture_logs() as logs:
        for _ in progress(range(5), tty=False, enabled=False, every_s=0.0):
            pass
        for i in progress(range(100), desc="epoch 1/1", tty=False, every_s=3600.0):
            if i == 9:
                break
    assert len(logs) == 1 and logs[0]["event"] == "progress_done" and logs[0]["done"] == 9


def test_a_log_file_gets_json_lines_and_no_carriage_returns(tmp_path: Path) -> None:
    """What the demo's training subprocess writes when its stderr is a file."""
    script = (
        "import time\n"
        "from core.logs import configure_logging\n"
        "from core.progress import progress\n"
        "configure_logging('INFO')\n"
        "for _ in progress(range(400), desc='epoch 1/1', unit='batch'):\n"
        "    time.sleep(0.001)\n"
    )
    log_path = tmp_path / "train.log"
    with open(log_path, "wb") as out:
        subprocess.run([sys.executable, "-c", script], cwd=ROOT, stdout=out, stderr=out, check=True,
                       env=os.environ | {"SHOPRANK_PROGRESS_LOG_S": "0.05"})
    text = log_path.read_text()
    assert "\r" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines[-1]["event"] == "progress_done" and lines[-1]["done"] == 400
    periodic = [e for e in lines if e["event"] == "progress"]
    # ~0.4 s of work at a line per 0.05 s: a handful of lines, far fewer than the 400 steps.
    assert 1 <= len(periodic) < 100
    assert all(e["task"] == "epoch 1/1" and e["logger"] == "core.progress" for e in lines)
