"""What an operator reads from protoad-serve: Triton's output less its known-harmless GPU lines on a CPU host,
and one line saying why Triton stopped when the model does not load. No serving environment needed."""

from __future__ import annotations

import io

from protoad_edge.runtime.serving.serve import TritonOutput, load_error

# Triton 2.51's start-up on a host without a GPU, as protoad-serve printed it (PyTriton 0.7, CPU-only machine).
CPU_HOST = (
    'W1205 20:33:28.504504 6823 pinned_memory_manager.cc:273] "Unable to allocate pinned system memory, pinned memory '
    'pool will not be available: CUDA driver version is insufficient for CUDA runtime version"\n'
    'I1205 20:33:28.504571 6823 cuda_memory_manager.cc:117] "CUDA memory pool disabled"\n'
    'E1205 20:33:28.504673 6823 server.cc:241] "CudaDriverHelper has not been initialized."\n'
    "Error: Failed to initialize NVML\n"
    'W1205 20:33:28.513984 6823 metrics.cc:798] "DCGM unable to start: DCGM initialization error"\n'
    'I1205 20:33:28.514253 6823 metrics.cc:770] "Collecting CPU metrics"\n'
)
HARMLESS_LINES = [1, 3, 4, 5]  # 1-based, in CPU_HOST
# A real error must still show (the model failing to load, as Triton logged it).
LOAD_FAILED = (
    "E1205 20:36:37.025810 10981 model_lifecycle.cc:642] \"failed to load 'tiny' version 1: Internal: "
    "ModuleNotFoundError: No module named 'viztracer'\\n\\nAt:\\n  /ws/model-store/tiny/1/model.py(381): "
    'initialize\\n"'
)


def filtered(text: str, piece: int) -> tuple[str, list[str]]:
    """``text`` through TritonOutput in pieces of ``piece`` characters (PyTriton hands Triton's output over
    unbuffered, so lines arrive split): (what passed, the log lines)."""
    out, logged = io.StringIO(), []
    output = TritonOutput(out, logged.append)
    for start in range(0, len(text), piece):
        output.write(text[start : start + piece])
    output.finish()
    return out.getvalue(), logged


def test_the_gpu_lines_of_a_cpu_host_are_hidden_and_said_once() -> None:
    lines = CPU_HOST.splitlines()
    for piece in (7, 1000):
        shown, logged = filtered(CPU_HOST + LOAD_FAILED + "\nI1205 last line without newline", piece)
        expected = [line for n, line in enumerate(lines, 1) if n not in HARMLESS_LINES]
        assert shown.splitlines() == [*expected, LOAD_FAILED, "I1205 last line without newline"]
        assert len(logged) == 1 and "no usable GPU" in logged[0]
    assert not any(("error" in line.lower() or line.startswith("E1")) for line in expected)


def test_nothing_hidden_says_nothing() -> None:
    shown, logged = filtered("I1205 model_lifecycle.cc:839] \"successfully loaded 'tiny'\"\n", 5)
    assert shown == "I1205 model_lifecycle.cc:839] \"successfully loaded 'tiny'\"\n" and logged == []


def test_why_triton_stopped_is_its_first_real_error() -> None:
    logs = CPU_HOST + LOAD_FAILED + "\nerror: creating server: Internal - failed to load all models\n"
    assert load_error(logs) == "ModuleNotFoundError: No module named 'viztracer'"
    assert load_error(CPU_HOST + "error: creating server: Invalid argument - --http-port\n") == (
        "creating server: Invalid argument - --http-port"
    )
    assert load_error(CPU_HOST) == "tritonserver exited (no error logged)"
