"""The GPU first-neighbour search: reduced-precision products, yet the exact CPU search's answers.

The algorithm is device-independent torch, so its checks run here on the CPU (torch computes FP16
products there too); the tests marked gpu repeat the comparison on CUDA, where the speed is.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from protoad_edge.builder.finch import finch, first_neighbours  # noqa: E402
from protoad_edge.builder.gpu_neighbours import PRECISIONS, error_bound, gpu_first_neighbours  # noqa: E402
from protoad_edge.builder.neighbours import make_search  # noqa: E402
from protoad_edge.errors import ProtoADError  # noqa: E402


def clustered(seed: int, n: int, dim: int, groups: int, spread: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((groups, dim))
    x = centres[rng.integers(0, groups, n)] + spread * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def assert_same(found, exact, x: np.ndarray | None = None) -> None:
    """Same neighbours as the CPU search and the same FP32 similarities (other summation orders: 1e-5).

    Where two candidates are as similar as FP32 can tell (seen on an H200: 0.80872110 against 0.80872102 in
    float64, 8e-8 apart), another summation order may pick the other: such a row passes when ``x`` is given
    and its neighbour is as similar, in float64, as the CPU's to 1e-6; at most 0.1% of the rows.
    """
    differ = np.flatnonzero(found.index != exact.index)
    if len(differ) and x is not None:
        unit = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
        gap = [abs(unit[r] @ unit[found.index[r]] - unit[r] @ unit[exact.index[r]]) for r in differ]
        assert max(gap) <= 1e-6 and len(differ) <= 0.001 * len(x), (differ[:5], gap[:5])
    else:
        np.testing.assert_array_equal(found.index, exact.index)
    np.testing.assert_allclose(found.similarity, exact.similarity, atol=1e-5)


@pytest.fixture(autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("memory_bytes", [None, 0], ids=["resident", "streamed"])
def test_equals_the_exact_cpu_search(precision: str, memory_bytes: int | None) -> None:
    x = clustered(0, 2000, 192, 40, 0.4)
    lines: list[str] = []
    found = gpu_first_neighbours(
        x, device="cpu", precision=precision, block=300, memory_bytes=memory_bytes, log=lines.append
    )  # 300 does not divide 2000: a short last block
    assert_same(found, first_neighbours(x))
    assert bool(lines) == (precision != "fp32")


def test_near_ties_are_settled_in_fp32() -> None:
    # Row 0's two nearest rows differ in cosine by about 1e-5, far below FP16's resolution, and one
    # candidate per tile is kept: the fast product cannot tell them apart, the FP32 search must.
    rng = np.random.default_rng(1)
    base = rng.standard_normal(256)
    base /= np.linalg.norm(base)
    step = rng.standard_normal(256)
    step -= step @ base * base
    step /= np.linalg.norm(step)
    near = [base + e * step for e in (0.0, 0.0316, 0.0313)]  # cos about 0.99950 and 0.99951
    x = np.vstack([near, clustered(2, 500, 256, 10, 0.2).astype(np.float64)]).astype(np.float32)
    lines: list[str] = []
    found = gpu_first_neighbours(x, device="cpu", precision="fp16", candidates=1, block=128, log=lines.append)
    assert_same(found, first_neighbours(x))
    assert found.index[0] == 2
    retried = int(lines[0].split(" of ")[0].rsplit(" ", 1)[-1].replace(",", ""))
    assert retried >= 1


def test_duplicates_tie_to_the_lowest_index() -> None:
    x = np.repeat(clustered(3, 200, 64, 5, 0.3), 3, axis=0)  # every row three times: exact ties
    for precision in ("fp16", "fp32"):
        found = gpu_first_neighbours(x, device="cpu", precision=precision, block=97, log=lambda _: None)
        assert_same(found, first_neighbours(x))
        assert found.index[0] == 1 and found.index[1] == 0 and found.index[2] == 0


@pytest.mark.parametrize("precision", ["fp16", "tf32"])
def test_error_bound_holds_for_unit_rows(precision: str) -> None:
    # The settling rule is only as sound as the bound: check it on the widest rows the build sees.
    dim = 1792
    rng = np.random.default_rng(4)
    a = rng.standard_normal((256, dim))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b = a[rng.permutation(256)] + 0.05 * rng.standard_normal((256, dim))
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    dtype = PRECISIONS[precision][0]
    if precision == "tf32":  # TF32 rounds the inputs to 10 mantissa bits: model it on the CPU
        ta, tb = (torch.from_numpy(v).float() for v in (a, b))
        ta, tb = (t.view(torch.int32).bitwise_and(~0x1FFF).view(torch.float32) for t in (ta, tb))
        fast = (ta @ tb.T).double().numpy()
    else:
        fast = (torch.from_numpy(a).to(dtype) @ torch.from_numpy(b).to(dtype).T).double().numpy()
    assert np.abs(fast - a @ b.T).max() <= error_bound(precision, dim)
    assert error_bound("fp32", dim) == 0.0


def test_single_row_and_bad_input() -> None:
    one = gpu_first_neighbours(np.ones((1, 4), np.float32), device="cpu", log=lambda _: None)
    assert one.index[0] == 0 and one.similarity[0] == -np.inf
    x = clustered(5, 50, 8, 3, 0.3).astype(np.float32)
    x[31, 2] = np.inf
    with pytest.raises(ProtoADError, match="row 31"):
        gpu_first_neighbours(x, device="cpu", log=lambda _: None)
    with pytest.raises(ValueError, match="precision"):
        gpu_first_neighbours(x, device="cpu", precision="int8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_a_missing_cuda_device_is_named() -> None:
    with pytest.raises(ProtoADError, match="'cuda'.*--device cpu"):
        make_search("cuda")(np.ones((3, 4), np.float32))


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("precision", sorted(PRECISIONS))
def test_cuda_equals_the_exact_cpu_search(precision: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = clustered(6, 6000, 1792, 60, 0.5)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 allowed globally: fp16/fp32 searches must not use it
    try:
        found = gpu_first_neighbours(x, device="cuda", precision=precision, block=1500, log=print)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(saved)
    assert_same(found, first_neighbours(x), x)


@pytest.mark.gpu
def test_cuda_finch_partitions_equal_the_cpu_ones() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = clustered(7, 5000, 256, 30, 0.6)
    a = finch(x, max_prototypes=1, search=make_search("cuda", log=print), log=print)
    b = finch(x, max_prototypes=1, log=lambda _: None)
    assert a.counts == b.counts
    for p, q in zip(a.partitions, b.partitions):
        np.testing.assert_array_equal(p, q)
