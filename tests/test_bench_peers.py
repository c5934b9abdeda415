"""benchmarks/bench_peers.py: the peers are fitted on exactly the bundle's training images (its held-out ones left
out, as the build split them), and the table's gate column judges each row against its own model's FP32 row."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import bench_peers
import numpy as np
import pytest

from protoad_edge.builder.pipeline import split_train


@pytest.mark.parametrize(("images", "val_split", "seed"), [(209, 0.1, 0), (20, 0.1, 3), (7, 0.3, 1)])
def test_the_peers_train_on_the_bundles_training_images(images: int, val_split: float, seed: int) -> None:
    train = [f"{i:03d}.png" for i in range(images)]
    fit, held = split_train(train, val_split, seed)
    info = SimpleNamespace(seed=seed, build={"images": {"held_out": len(held)}})
    assert bench_peers.training_images(train, info) == fit


def test_the_gate_column_judges_each_row_against_its_own_fp32() -> None:
    test = SimpleNamespace(labels=np.array([0, 0, 1, 1], bool))
    scores = np.array([0.1, 0.2, 0.3, 0.4])

    def run(model: str, label: str, image: float, pixel: float, ranks: np.ndarray) -> bench_peers.Run:
        done = bench_peers.Run(
            model, label, label, lambda: lambda x: (x, x), image_auroc=image, pixel_auroc=pixel, scores=ranks
        )
        done.ms = {1: [100.0, 120.0, 110.0], 8: [50.0]}
        return done

    text = bench_peers.table(
        [
            run("ours", "onnxruntime FP32", 0.9, 0.8, scores),
            run("ours", "OpenVINO BF16", 0.9, 0.799, scores / 2),
            run("peer", "onnxruntime FP32", 0.7, 0.6, scores),
            run("peer", "OpenVINO default (BF16)", 0.6, 0.6, scores[::-1].copy()),
        ],
        test,
    )
    rows = text.splitlines()[2:]
    assert rows[0] == "| ours | onnxruntime FP32 | 90.0 / 80.0 | reference | 110 | 50 | 1.00x |"
    assert "| passes: -0.00 / -0.10 pt, Spearman 1.0000 |" in rows[1]
    assert "| reference |" in rows[2]  # the peer's own FP32, not ours
    assert "| fails: -10.00 / -0.00 pt, Spearman -1.0000 |" in rows[3]


def test_a_peer_too_heavy_to_keep_open_is_opened_for_each_use_and_warmed_each_time(tmp_path: Path) -> None:
    """PaDiM's 3.9 GB graph, three rows of it open at once, ran a 24 GB machine out of memory: a graph at or above
    --keep-open-below is opened for each timed use (one at a time) and released, the others once."""
    light, heavy = tmp_path / "light.onnx", tmp_path / "heavy.onnx"
    light.write_bytes(b"x" * 1000)
    heavy.write_bytes(b"x" * 10)
    (tmp_path / "heavy.onnx.data").write_bytes(b"x" * 2000)  # external weights count
    assert bench_peers.graph_bytes([str(light), str(heavy)]) == 3010
    limit_gb = 1500 / 2**30
    light_runs = bench_peers.peer("light", str(light), 1, limit_gb)
    heavy_runs = bench_peers.peer("heavy", str(heavy), 1, limit_gb)
    assert [r.keep_open for r in light_runs + heavy_runs] == [True] * 3 + [False] * 3

    opened: dict[str, int] = {"light": 0, "heavy": 0}
    calls: dict[str, int] = {"light": 0, "heavy": 0}

    def opener(name: str) -> bench_peers.Infer:
        opened[name] += 1

        def infer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            calls[name] += 1
            return x, x

        return infer

    runs = [
        bench_peers.Run("light", "ort", "ort", lambda: opener("light")),
        bench_peers.Run("heavy", "ort", "ort", lambda: opener("heavy"), keep_open=False),
    ]
    test = SimpleNamespace(crops=np.zeros((8, 4, 4, 3), np.uint8))
    bench_peers.timing(runs, test, rounds=3)
    assert opened == {"light": 1, "heavy": 3}
    # two warm-up calls on each opening, one untimed call to settle each turn, two timed calls
    assert calls == {"light": 2 + 3 * 3, "heavy": 3 * (2 + 3)}
    assert runs[1].held is None and runs[0].held is not None
    assert [len(r.ms[1]) for r in runs] == [3, 3]
