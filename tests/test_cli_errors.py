"""Every CLI failure a new user meets is one clear line (run in a subprocess, as they would), and the four
CLIs speak one vocabulary in their --help (--threads, --batch vs --batch-size, --out)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from protoad_edge.cli.bench import main as bench_main
from protoad_edge.cli.eval import main as eval_main
from protoad_edge.cli.export import main as export_main
from protoad_edge.cli.run import main as run_main

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "protoad-export": export_main,
    "protoad-run": run_main,
    "protoad-eval": eval_main,
    "protoad-bench": bench_main,
}
# Modules of the [build] extra missing as in a runtime-only install (``pip install -e .``): a real
# "No module named" error, the one an absent package raises.
NO_BUILD_EXTRA = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision'):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Absent())
"""


def cli(module: str, *args: str, prelude: str = "", cwd: Path) -> subprocess.CompletedProcess[str]:
    """``protoad-XXX ARGS`` as a user runs it: a fresh interpreter, the entry point's ``main``."""
    code = prelude + (
        f"import sys\nsys.argv = ['cli', *{list(args)!r}]\nfrom protoad_edge.cli.{module} import main\nmain()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single line on stderr, after checking it is an ``error:`` line of a failed run without a traceback."""
    assert done.returncode != 0, done.stdout
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def test_export_without_torch_says_what_to_install(tmp_path: Path) -> None:
    done = cli(
        "export", "--category", "demo", "--data-root", str(tmp_path / "data"), prelude=NO_BUILD_EXTRA, cwd=tmp_path
    )
    line = one_error_line(done)
    assert "needs torch, which is not installed: pip install 'protoad-edge[build]'" in line
    assert "--from-onnx" in line and "without torch" in line


@pytest.mark.skipif(Path("/dev/video7").exists(), reason="this machine has a camera 7")
def test_an_absent_camera_is_one_line(tmp_path: Path) -> None:
    """OpenCV (V4L2, FFmpeg, obsensor) logged a dozen WARN/ERROR lines before the error; now only the error."""
    done = cli("run", "camera7", "--preview", str(tmp_path / "first.png"), cwd=tmp_path)
    assert one_error_line(done) == (
        "error: cannot open camera7 (OpenCV camera index 7): not connected, or in use by another program?"
    )


def option_help(command: click.Command) -> dict[str, str]:
    """Each option of ``command --help`` -> its entry (names, metavar, help, default), whitespace collapsed."""
    result = CliRunner().invoke(command, ["--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    options = result.output[result.output.index("Options:") :].splitlines()[1:]
    entries: list[str] = []
    for line in options:
        if re.match(r"\s{2}-", line):
            entries.append(line.strip())
        elif entries:
            entries[-1] += " " + line.strip()
    helps = {}
    for entry in entries:
        names = re.findall(r"--[a-z0-9-]+", entry.split("  ")[0])
        for name in names:
            helps.setdefault(name, " ".join(entry.split()))
    return helps


def test_threads_means_cpu_threads_with_0_for_all_cores_in_every_cli() -> None:
    having = []
    for name, command in COMMANDS.items():
        helps = option_help(command)
        if "--threads" in helps:
            having.append(name)
            assert "CPU threads" in helps["--threads"] and "(0 = all cores)" in helps["--threads"], (name, helps)
            assert "default: 0" in helps["--threads"], name
    assert {"protoad-export", "protoad-eval", "protoad-bench"} <= set(having)


def test_batch_batch_size_and_out_say_what_they_are() -> None:
    export, evaluate, bench = (option_help(c) for c in (export_main, eval_main, bench_main))
    assert "--batch-size" not in bench and "--batch" not in export and "--batch" not in evaluate
    assert bench["--batch"].startswith("--batch N[,N...] Batch sizes to measure, each in images per inference call")
    assert "Images per network call" in export["--batch-size"] and "Images per backend call" in evaluate["--batch-size"]
    assert "Folder the bundle is written to" in export["--out"]
    assert "Folder for the pictures (not a model)" in evaluate["--out"]
