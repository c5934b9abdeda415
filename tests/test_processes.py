"""tests/processes.finish: the lines a test's readline() left buffered are not lost (Popen.communicate(timeout=...)
loses them - the cause of test_reload's "missing frame")."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from processes import finish

CHILD = "import time\nfor i in range(1000): print(i, flush=True)\ntime.sleep(1.0)\nprint(1000, flush=True)"


def test_every_line_after_a_readline_that_buffered_many() -> None:
    process = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)  # lines 0-999 are in the pipe now
    process.stdout.readline()  # line 0; the reader has buffered the pipe's other lines
    first_lines = [process.stdout.readline() for _ in range(2)]
    rest, stderr = finish(process, 30)
    assert [int(x) for x in first_lines + rest.splitlines()] == list(range(1, 1001))
    assert stderr is None and process.returncode == 0


def test_a_process_still_running_after_the_timeout_is_killed() -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline() == "up\n"
    with pytest.raises(subprocess.TimeoutExpired):
        finish(process, 0.5)
    assert process.wait(5) != 0  # killed
