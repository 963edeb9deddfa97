"""Tests of the kernel layer (intrain.kernels): backends, exactness, worst cases.

* ``reference`` is checked against float64 torch (exact for these small sizes: every sum is far
  below 2**53) and against closed-form worst cases, and must never create a float tensor.
* ``cpu`` must be bit-identical to ``reference`` everywhere, on its float path and on its int8
  GEMM path (two backends, whatever the machine would pick): hypothesis property tests over
  shapes/strides/paddings, int8 and int16 operands, and with the float32 budget lowered so that
  the channel/sample/column blocking and the float64 fall-back are exercised on small shapes.
* Worst cases at the largest reduction lengths the models use are compared with exact Python
  integer arithmetic.
"""

from __future__ import annotations

from dataclasses import FrozenInstanceError, replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from intrain import kernels
from intrain.kernels import (Backend, CpuBackend, CpuSettings, CudaBackend, CudaSettings,
                             ReferenceBackend)
from intrain.kernels import reference as REF
from intrain.kernels.cpu import bounds as B
from intrain.kernels.cpu import exact_to_narrow, weight_grad
from intrain.kernels.cpu.bounds import F32_EXACT, F64_EXACT, FloatLimits
from intrain.kernels import int16_gemm
from intrain.numeric import native
from intrain.kernels.int_mm import INT32_REDUCTION, mm_int32
from intrain.kernels.cpu.chunks import requantize_chunks
from intrain.numeric.accumulate import shift_operand
from intrain.numeric.requant import requantize, requantize_product

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])

#: The cpu backend's float path, whatever this machine would pick: no int8 GEMM, and no direct
#: convolutions of few input channels (``CPU_DIRECT`` has those).
FLOAT_PATH = CpuSettings(use_int8_gemm=False, direct_conv_max_columns=0)


def cpu_paths(tuned: CpuSettings = FLOAT_PATH, limits: FloatLimits = FloatLimits()
              ) -> tuple[CpuBackend, CpuBackend]:
    """The cpu backend with the settings ``tuned`` on its float path and on its int8 GEMM
    path."""
    return (CpuBackend(replace(tuned, use_int8_gemm=False), limits),
            CpuBackend(replace(tuned, use_int8_gemm=True), limits))


CPU, CPU_INT8 = cpu_paths()
#: The float path with the direct convolutions of few input channels: what a CPU without int8
#: GEMM units runs (float budgets do not concern those kernels).
CPU_DIRECT = CpuBackend(replace(FLOAT_PATH, direct_conv_max_columns=32))
INT_MM = CudaBackend()
#: The reference functions and every backend path, for checks they must all pass.
ALL = (REF, CPU, CPU_INT8, CPU_DIRECT, INT_MM)
LIMITS = FloatLimits()


# ------------------------------------------------------------------------------- helpers

def rand_int(gen: torch.Generator, shape, dtype=torch.int8, mode: str = "uniform") -> torch.Tensor:
    """Random integer tensor; modes: uniform over the range, extremes (+-max), sparse small."""
    hi = 127 if dtype == torch.int8 else 32767
    if mode == "uniform":
        v = torch.randint(-hi, hi + 1, shape, generator=gen, dtype=torch.int64)
    elif mode == "extreme":
        v = (torch.randint(0, 2, shape, generator=gen, dtype=torch.int64) * 2 - 1) * hi
    elif mode == "sparse":
        v = torch.randint(-hi, hi + 1, shape, generator=gen, dtype=torch.int64)
        v = v * (torch.randint(0, 4, shape, generator=gen) == 0)
    else:
        raise ValueError(mode)
    return v.to(dtype)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.equal(a, b), f"max diff {(a.to(torch.int64) - b.to(torch.int64)).abs().max()}"


def cpu_budget(f32: int | tuple[int, int], max_blocks: int = 10**6, grouped: bool = True
               ) -> tuple[CpuBackend, CpuBackend]:
    """Both paths of a cpu backend with a lowered float32 (and optionally float64) budget: still
    exact, a smaller bound is only more conservative, and blocking, the float64 fall-back,
    float64 blocks and the int64 fall-back then all run on small shapes (on the int8 GEMM path:
    for int16 operands). ``grouped=False`` keeps weight gradients off the grouped path, on the
    block plans."""
    f32, f64 = (f32, F64_EXACT) if isinstance(f32, int) else f32
    tuned = replace(FLOAT_PATH, max_f32_blocks_conv=max_blocks, max_f32_blocks_mm=max_blocks)
    if not grouped:
        tuned = replace(tuned, grouped_max_columns=0, grouped_max_samples=0)
    return cpu_paths(tuned, FloatLimits(f32, f64))


def assert_requantized_same(name: str, *args, paths=(CPU, CPU_INT8, CPU_DIRECT), rectify: bool = False) -> None:
    """cpu's product_to_int8 gives the bits of requantising the reference accumulator (with
    ``rectify``, its positive part)."""
    exact = getattr(REF, name)(*args)
    expected = requantize(exact.clamp(min=0) if rectify else exact, torch.zeros((), dtype=torch.int64))
    for cpu in paths:
        values, shift = cpu.product_to_int8(name, *args, rectify=rectify)
        assert_same(values, expected.v)
        assert_same(shift, expected.e)


def both(name: str, *args, paths=(CPU, CPU_INT8, CPU_DIRECT)):
    """The cpu backend, on each of its paths (``cpu_paths``), equals the reference."""
    r = getattr(REF, name)(*args)
    for cpu in paths:
        assert_same(getattr(cpu, name)(*args), r)
    return r


def spy_on_grouped_weight_grad(monkeypatch) -> list[int]:
    """The group sizes of the grouped weight gradients the cpu backend computes from now on."""
    taken = []
    real = weight_grad.grouped_weight_grad

    def spy(d, x, khw, s, p, group, chunk_bytes):
        taken.append(group)
        return real(d, x, khw, s, p, group, chunk_bytes)

    monkeypatch.setattr(weight_grad, "grouped_weight_grad", spy)
    return taken


def valid_taps(out_idx: int, k: int, s: int, p: int, size: int) -> int:
    """Number of kernel offsets i for which input index out_idx*s + i - p is inside [0, size)."""
    return sum(1 for i in range(k) if 0 <= out_idx * s + i - p < size)


# ------------------------------------------------------------------------------ get_backend

def test_get_backend_names():
    assert kernels.BACKENDS == ("reference", "cpu", "cuda")
    assert type(kernels.get_backend("reference")) is ReferenceBackend
    assert type(kernels.get_backend("cpu")) is CpuBackend
    assert type(kernels.get_backend("auto")) is CpuBackend
    assert type(kernels.get_backend("auto", torch.device("cpu"))) is CpuBackend
    assert type(kernels.get_backend("reference", "cuda")) is ReferenceBackend
    assert type(kernels.get_backend("auto", "cuda")) is CudaBackend
    assert type(kernels.get_backend("cuda")) is CudaBackend  # runs on CPU tensors too
    for name in kernels.BACKENDS:
        assert kernels.get_backend(name).name == name
    assert kernels.get_backend("cpu").settings == CpuSettings()
    off = CpuSettings(use_int8_gemm=False)
    assert kernels.get_backend("auto", "cpu", off).settings is off
    small = CudaSettings(chunk_bytes=300)
    assert kernels.get_backend("cuda", "cpu", small).settings is small
    assert kernels.get_backend(CPU) is CPU  # a backend object is used as it is
    assert kernels.get_backend(INT_MM, "cuda") is INT_MM


def test_every_backend_has_every_product():
    assert kernels.PRODUCTS == ("linear_forward", "linear_backward_input",
                                "linear_backward_weight", "conv2d_forward",
                                "conv2d_backward_input", "conv2d_backward_weight")
    by_name = [kernels.get_backend(name) for name in kernels.BACKENDS]
    for be in (ReferenceBackend(), CPU, CPU_INT8, INT_MM, *by_name):
        assert isinstance(be, Backend)
        for f in kernels.PRODUCTS:
            assert callable(getattr(be, f))
            assert callable(getattr(Backend, f))


def test_a_backend_that_overrides_nothing_gives_the_reference_results():
    class Plain(Backend):
        name = "plain"

    plain = Plain()
    gen = torch.Generator().manual_seed(14)
    x, wt, d = conv_case(gen, 2, 3, 4, 7, 6, 3, 3, (2, 1), (1, 0))
    xl, wl, dl = rand_int(gen, (4, 9)), rand_int(gen, (5, 9)), rand_int(gen, (4, 5))
    cases = [("linear_forward", xl, wl), ("linear_backward_input", dl, wl),
             ("linear_backward_weight", dl, xl), ("conv2d_forward", x, wt, (2, 1), (1, 0)),
             ("conv2d_backward_input", d, wt, (7, 6), (2, 1), (1, 0)),
             ("conv2d_backward_weight", d, x, 3, (2, 1), (1, 0))]
    assert sorted(c[0] for c in cases) == sorted(kernels.PRODUCTS)
    for name, *args in cases:
        assert_same(getattr(plain, name)(*args), getattr(REF, name)(*args))
    assert not hasattr(plain, "product_to_int8")  # requantize_product then requantises itself


def test_settings_are_frozen_and_checked():
    for frozen, field in ((CpuSettings(), "use_int8_gemm"), (CudaSettings(), "chunk_bytes"),
                          (FloatLimits(), "float32")):
        with pytest.raises(FrozenInstanceError):
            setattr(frozen, field, 1)
    assert CPU.settings == FLOAT_PATH and CPU_INT8.settings.use_int8_gemm is True
    with pytest.raises(ValueError, match="float limits"):
        FloatLimits(float32=2**24 + 1)  # the proof does not hold above 2**24
    with pytest.raises(ValueError, match="float limits"):
        FloatLimits(float64=2**53 + 1)
    with pytest.raises(ValueError, match="int32_terms"):
        CudaBackend(int32_terms=INT32_REDUCTION + 1)
    with pytest.raises(TypeError, match="CpuSettings"):
        CpuBackend(CudaSettings())
    with pytest.raises(TypeError, match="CudaSettings"):
        CudaBackend(CpuSettings())


def test_get_backend_errors():
    with pytest.raises(ValueError, match="valid names.*reference.*cpu.*cuda"):
        kernels.get_backend("fast")
    with pytest.raises(ValueError, match="cpu backend"):
        kernels.get_backend("cpu", "cuda")
    with pytest.raises(ValueError, match="must be a string"):
        kernels.get_backend(3)
    with pytest.raises(ValueError, match="cpu backend"):  # an object is checked the same way
        kernels.get_backend(CPU, "cuda")
    with pytest.raises(ValueError, match="reference backend takes no settings"):
        kernels.get_backend("reference", "cpu", CpuSettings())
    with pytest.raises(TypeError, match="CudaSettings"):
        kernels.get_backend("auto", "cuda", CpuSettings())
    with pytest.raises(ValueError, match="its own"):
        kernels.get_backend(CPU, "cpu", CpuSettings())


def test_argument_errors():
    x = torch.zeros(2, 3, dtype=torch.int8)
    for be in ALL:
        with pytest.raises(TypeError):
            be.linear_forward(x.float(), x)
        with pytest.raises(TypeError):
            be.linear_forward(x.to(torch.int32), x)
        with pytest.raises(ValueError):
            be.linear_forward(x, torch.zeros(2, 4, dtype=torch.int8))
        with pytest.raises(ValueError, match="131071"):  # int32 bound of an int8 reduction
            be.linear_forward(torch.zeros(1, 131072, dtype=torch.int8),
                              torch.zeros(1, 131072, dtype=torch.int8))
        xc = torch.zeros(1, 2, 5, 5, dtype=torch.int8)
        with pytest.raises(ValueError):
            be.conv2d_forward(xc, torch.zeros(1, 3, 3, 3, dtype=torch.int8))
        with pytest.raises(ValueError):
            be.conv2d_forward(xc, torch.zeros(1, 2, 6, 6, dtype=torch.int8))
        with pytest.raises(ValueError):  # d does not match input_hw
            be.conv2d_backward_input(torch.zeros(1, 1, 4, 4, dtype=torch.int8),
                                     torch.zeros(1, 2, 3, 3, dtype=torch.int8), (5, 5), 1, 0)
        with pytest.raises(ValueError):
            be.conv2d_backward_weight(torch.zeros(1, 1, 3, 3, dtype=torch.int8),
                                      torch.zeros(2, 2, 5, 5, dtype=torch.int8), 3)


def test_result_dtypes():
    g = torch.Generator().manual_seed(0)
    x8, w8 = rand_int(g, (3, 5)), rand_int(g, (4, 5))
    x16 = rand_int(g, (3, 5), torch.int16)
    for be in ALL:
        assert be.linear_forward(x8, w8).dtype == torch.int32
        assert be.linear_forward(x16, w8).dtype == torch.int64
        assert be.linear_backward_input(rand_int(g, (3, 4)), w8).dtype == torch.int32
        assert be.linear_backward_weight(rand_int(g, (3, 4)), x8).dtype == torch.int32
        assert be.linear_backward_weight(rand_int(g, (3, 4), torch.int16), x8).dtype == torch.int64
        xc, wc = rand_int(g, (1, 2, 5, 5)), rand_int(g, (3, 2, 3, 3))
        assert be.conv2d_forward(xc, wc).dtype == torch.int32
        assert be.conv2d_forward(xc.to(torch.int16), wc).dtype == torch.int64
        dc = rand_int(g, (1, 3, 3, 3))
        assert be.conv2d_backward_input(dc, wc, (5, 5)).dtype == torch.int32
        assert be.conv2d_backward_weight(dc, xc, 3).dtype == torch.int32
        assert be.conv2d_backward_weight(dc, xc.to(torch.int16), 3).dtype == torch.int64
    # the longest int8 weight-gradient reduction with an int32 result, and one term more
    for n, dtype in ((131071, torch.int32), (131072, torch.int64)):
        d, x = torch.ones(n, 1, dtype=torch.int8), torch.ones(n, 1, dtype=torch.int8)
        for be in ALL:
            assert be.linear_backward_weight(d, x).dtype == dtype
        assert int(REF.linear_backward_weight(d, x)) == n


# ------------------------------------------------------------- reference against float64

def conv_case(gen, n, c, o, h, w, kh, kw, s, p, dtype=torch.int8):
    x = rand_int(gen, (n, c, h, w), dtype)
    wt = rand_int(gen, (o, c, kh, kw), dtype)
    ho = (h + 2 * p[0] - kh) // s[0] + 1
    wo = (w + 2 * p[1] - kw) // s[1] + 1
    d = rand_int(gen, (n, o, ho, wo), dtype)
    return x, wt, d


@pytest.mark.parametrize("case", [
    (2, 3, 4, 7, 9, 3, 2, (2, 2), (1, 1)),
    (1, 1, 2, 5, 5, 5, 5, (1, 1), (2, 2)),
    (3, 2, 3, 8, 6, 3, 3, (3, 3), (2, 2)),
    (2, 3, 2, 10, 11, 4, 3, (3, 2), (0, 1)),  # (H + 2p - kh) % s != 0
    (2, 1, 6, 28, 28, 5, 5, (1, 1), (2, 2)),  # LeNet conv1
    (2, 6, 16, 14, 14, 5, 5, (1, 1), (0, 0)),  # LeNet conv2
])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16])
def test_reference_conv_matches_float64_torch(case, dtype):
    n, c, o, h, w, kh, kw, s, p = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    x, wt, d = conv_case(gen, n, c, o, h, w, kh, kw, s, p, dtype)
    # float64 is exact here: every sum is below 2**30 * 150 < 2**53.
    xf = x.to(torch.float64).requires_grad_()
    wf = wt.to(torch.float64).requires_grad_()
    y = F.conv2d(xf, wf, stride=s, padding=p)
    y.backward(d.to(torch.float64))
    assert torch.equal(REF.conv2d_forward(x, wt, s, p).to(torch.float64), y.detach())
    assert torch.equal(REF.conv2d_backward_input(d, wt, (h, w), s, p).to(torch.float64), xf.grad)
    assert torch.equal(REF.conv2d_backward_weight(d, x, (kh, kw), s, p).to(torch.float64),
                       wf.grad)
    # and conv_transpose2d is the same adjoint
    op = (h + 2 * p[0] - kh - (d.shape[2] - 1) * s[0], w + 2 * p[1] - kw - (d.shape[3] - 1) * s[1])
    ct = F.conv_transpose2d(d.to(torch.float64), wt.to(torch.float64), None, s, p, op)
    assert torch.equal(REF.conv2d_backward_input(d, wt, (h, w), s, p).to(torch.float64), ct)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16])
def test_reference_linear_matches_float64_torch(dtype):
    gen = torch.Generator().manual_seed(1)
    x, w = rand_int(gen, (7, 33), dtype), rand_int(gen, (5, 33), dtype)
    d = rand_int(gen, (7, 5), dtype)
    xf, wf, df = x.double(), w.double(), d.double()
    assert torch.equal(REF.linear_forward(x, w).double(), xf @ wf.T)
    assert torch.equal(REF.linear_backward_input(d, w).double(), df @ wf)
    assert torch.equal(REF.linear_backward_weight(d, x).double(), df.T @ xf)


class _FloatAudit(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bad: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten((args, kwargs, out))[0]:
            if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
                self.bad.append(str(func))
        return out


def test_reference_creates_no_float_tensor():
    gen = torch.Generator().manual_seed(2)
    x, wt, d = conv_case(gen, 2, 3, 4, 9, 8, 3, 3, (2, 2), (1, 1))
    xl, wl, dl = rand_int(gen, (4, 6)), rand_int(gen, (3, 6)), rand_int(gen, (4, 3))
    with _FloatAudit() as audit:
        REF.conv2d_forward(x, wt, 2, 1)
        REF.conv2d_backward_input(d, wt, (9, 8), 2, 1)
        REF.conv2d_backward_weight(d, x, 3, 2, 1)
        REF.linear_forward(xl, wl)
        REF.linear_backward_input(dl, wl)
        REF.linear_backward_weight(dl, xl)
    assert audit.bad == []


# -------------------------------------------------------------- cpu == reference, properties

@st.composite
def conv_shapes(draw, max_c: int = 4):
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    p = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    h = max(1, kh - 2 * p[0] + draw(st.integers(0, 7)))
    w = max(1, kw - 2 * p[1] + draw(st.integers(0, 7)))
    n = draw(st.integers(1, 3))
    c, o = draw(st.integers(1, max_c)), draw(st.integers(1, max_c))
    return n, c, o, h, w, kh, kw, s, p


MODES = st.sampled_from(["uniform", "extreme", "sparse"])
DTYPES = st.sampled_from([(torch.int8, torch.int8), (torch.int16, torch.int16),
                          (torch.int8, torch.int16), (torch.int16, torch.int8)])
BUDGETS = st.sampled_from([2**24, 2**24, 2**17, 2**14, 2**12, (2**12, 2**16), (2**12, 2**34)])


def _conv_operands(shape, dtypes, modes, seed):
    """A generator and random x, w, d of a drawn convolution shape."""
    n, c, o, h, w, kh, kw, s, p = shape
    gen = torch.Generator().manual_seed(seed)
    ho = (h + 2 * p[0] - kh) // s[0] + 1
    wo = (w + 2 * p[1] - kw) // s[1] + 1
    x = rand_int(gen, (n, c, h, w), dtypes[0], modes[0])
    wt = rand_int(gen, (o, c, kh, kw), dtypes[1], modes[1])
    d = rand_int(gen, (n, o, ho, wo), dtypes[0], modes[2])
    return gen, x, wt, d


def _check_conv(shape, dtypes, modes, seed, budget, scalar_args):
    n, c, o, h, w, kh, kw, s, p = shape
    _, x, wt, d = _conv_operands(shape, dtypes, modes, seed)
    if scalar_args and s[0] == s[1] and p[0] == p[1] and kh == kw:
        s, p, khw = s[0], p[0], kh
    else:
        khw = (kh, kw)
    paths = cpu_budget(budget)
    both("conv2d_forward", x, wt, s, p, paths=paths)
    both("conv2d_backward_input", d, wt, (h, w), s, p, paths=paths)
    both("conv2d_backward_weight", d, x, khw, s, p, paths=paths)


@SETTINGS
@given(shape=conv_shapes(), dtypes=DTYPES, modes=st.tuples(MODES, MODES, MODES),
       seed=st.integers(0, 2**31 - 1), budget=BUDGETS, scalar_args=st.booleans())
def test_cpu_conv_matches_reference(shape, dtypes, modes, seed, budget, scalar_args):
    _check_conv(shape, dtypes, modes, seed, budget, scalar_args)


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=conv_shapes(max_c=40), modes=st.tuples(MODES, MODES, MODES),
       seed=st.integers(0, 2**31 - 1), budget=st.sampled_from([2**24, 2**20, 2**18]))
def test_cpu_conv_matches_reference_many_channels(shape, modes, seed, budget):
    _check_conv(shape, (torch.int8, torch.int8), modes, seed, budget, False)


@SETTINGS
@given(n=st.integers(1, 9), i=st.integers(1, 300), o=st.integers(1, 9), dtypes=DTYPES,
       modes=st.tuples(MODES, MODES, MODES), seed=st.integers(0, 2**31 - 1), budget=BUDGETS)
def test_cpu_linear_matches_reference(n, i, o, dtypes, modes, seed, budget):
    gen = torch.Generator().manual_seed(seed)
    x = rand_int(gen, (n, i), dtypes[0], modes[0])
    w = rand_int(gen, (o, i), dtypes[1], modes[1])
    d = rand_int(gen, (n, o), dtypes[0], modes[2])
    paths = cpu_budget(budget)
    both("linear_forward", x, w, paths=paths)
    both("linear_backward_input", d, w, paths=paths)
    both("linear_backward_weight", d, x, paths=paths)


# ------------------------------------------------ int16 products as int8 halves (cpu, DFP16)

def test_int16_halves_split_every_value():
    """Every int16 value is 256 * hi + lo + 128 with int8 halves, and 0 is (ZERO_HI, ZERO_LO)."""
    v = torch.arange(-32768, 32768, dtype=torch.int16)
    hi, lo = int16_gemm.split_halves(v)
    assert hi.dtype == lo.dtype == torch.int8
    assert torch.equal(hi.to(torch.int64) * 256 + lo.to(torch.int64) + 128, v.to(torch.int64))
    assert (hi[32768].item(), lo[32768].item()) == (int16_gemm.ZERO_HI, int16_gemm.ZERO_LO)


def halves_int(gen: torch.Generator, shape, mode: str) -> torch.Tensor:
    """int16 operands: uniform over the whole range, or only its ends and the values whose halves
    are at their ends (-32768, -32641, -129, -128, -1, 0, 127, 128, 255, 32639, 32640, 32767)."""
    if mode == "uniform":
        return torch.randint(-32768, 32768, shape, generator=gen).to(torch.int16)
    ends = torch.tensor([-32768, -32641, -129, -128, -1, 0, 127, 128, 255, 32639, 32640, 32767])
    return ends[torch.randint(0, len(ends), shape, generator=gen)].to(torch.int16)


#: The int8 GEMM path as it is, and with im2col chunks of one sample.
HALVES_PATHS = (CPU_INT8, CpuBackend(replace(FLOAT_PATH, use_int8_gemm=True, int8_gemm_chunk_bytes=1)))


@pytest.fixture(params=["C", "C on three threads", "PyTorch"])
def halves_calls(request, monkeypatch) -> list[str]:
    """Names of the int16_gemm products the cpu backend runs from now on; the parts combined in
    C (``native.combine_halves``: in one call, or cut into three ranges on threads whatever the
    size) or by the PyTorch code."""
    if request.param == "PyTorch":
        monkeypatch.setattr(native, "combine_halves", lambda *args, **kwargs: False)
    elif not native.available():
        pytest.skip("no C compiler here: the PyTorch case covers this machine")
    elif request.param == "C on three threads":
        monkeypatch.setattr(native, "PARALLEL_MIN", 1)
        threads = torch.get_num_threads()
        torch.set_num_threads(3)
        request.addfinalizer(lambda: torch.set_num_threads(threads))
    taken = []
    for name in ("mm", "conv", "conv_weight_grad"):
        real = getattr(int16_gemm, name)
        monkeypatch.setattr(int16_gemm, name, lambda *a, _real=real, _name=name, **k: taken.append(_name) or _real(*a, **k))
    return taken


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=conv_shapes(max_c=6), modes=st.tuples(*[st.sampled_from(["uniform", "ends"])] * 3),
       seed=st.integers(0, 2**31 - 1), n=st.integers(1, 9), i=st.integers(1, 200))
def test_cpu_int16_halves_match_reference(shape, modes, seed, n, i, halves_calls):
    """Every product of int16 operands on the int8 GEMM path, over shapes, strides and paddings,
    is the reference's, and runs as int8 halves; also with chunks of one sample (many pieces of
    the convolutions and of the weight gradient's int64 sum)."""
    halves_calls.clear()  # one fixture for all examples
    nc, c, o, h, w, kh, kw, s, p = shape
    gen = torch.Generator().manual_seed(seed)
    ho, wo = (h + 2 * p[0] - kh) // s[0] + 1, (w + 2 * p[1] - kw) // s[1] + 1
    x, wt = halves_int(gen, (nc, c, h, w), modes[0]), halves_int(gen, (o, c, kh, kw), modes[1])
    d = halves_int(gen, (nc, o, ho, wo), modes[2])
    both("conv2d_forward", x, wt, s, p, paths=HALVES_PATHS)
    both("conv2d_backward_weight", d, x, (kh, kw), s, p, paths=HALVES_PATHS)
    expected = ["conv", "conv_weight_grad"]
    if p[0] < kh and p[1] < kw:  # the input gradient as a convolution needs k - 1 - p >= 0
        both("conv2d_backward_input", d, wt, (h, w), s, p, paths=HALVES_PATHS)
        expected.append("conv")
    xl, wl, dl = halves_int(gen, (n, i), modes[0]), halves_int(gen, (o, i), modes[1]), halves_int(gen, (n, o), modes[2])
    for name, args in (("linear_forward", (xl, wl)), ("linear_backward_input", (dl, wl)),
                       ("linear_backward_weight", (dl, xl))):
        both(name, *args, paths=HALVES_PATHS)
    assert halves_calls == [name for name in expected for _ in HALVES_PATHS] + ["mm"] * 3 * len(HALVES_PATHS)


def test_cpu_int16_halves_worst_cases_at_the_longest_reduction(halves_calls):
    """The largest magnitudes, at the longest reduction one int32 piece of each half product
    holds (INT32_REDUCTION) and one term past it (two pieces), against Python integers: the
    halves of -32768 are (-128, -128) and of 32767 (127, 127), the int32 sums' extremes; then a
    VGG-sized convolution (576 terms) with padding, its input gradient and weight gradient."""
    for k in (INT32_REDUCTION, INT32_REDUCTION + 1):
        for a_value, b_value in ((-32768, -32768), (-32768, 32767), (32767, 32767)):
            a = torch.full((2, k), a_value, dtype=torch.int16)
            b = torch.full((3, k), b_value, dtype=torch.int16)
            out = CPU_INT8.linear_forward(a, b)
            assert out.dtype == torch.int64
            assert torch.equal(out, torch.full((2, 3), a_value * b_value * k, dtype=torch.int64))
    for value in (-32768, 32767):
        x = torch.full((2, 64, 8, 8), value, dtype=torch.int16)
        wt = torch.full((4, 64, 3, 3), -32768, dtype=torch.int16)
        d = torch.full((2, 4, 8, 8), value, dtype=torch.int16)
        both("conv2d_forward", x, wt, 1, 1, paths=(CPU_INT8,))
        both("conv2d_backward_input", d, wt, (8, 8), 1, 1, paths=(CPU_INT8,))
        both("conv2d_backward_weight", d, x, 3, 1, 1, paths=(CPU_INT8,))
    assert halves_calls == ["mm"] * 6 + ["conv", "conv", "conv_weight_grad"] * 2


@pytest.mark.parametrize("block", [1, 2, 3, 7])
def test_int16_weight_grad_in_blocks_of_output_channels(block):
    """The halves' weight gradient made a block of output channels at a time (7 channels in
    blocks of 1, 2, 3 and all 7: a last block narrower than the others, and one block) and a chunk
    of samples at a time equals the reference, with values at the halves' ends."""
    gen = torch.Generator().manual_seed(block)
    n, c, o, h, w = 5, 3, 7, 6, 5
    k = c * 3 * 3
    x = halves_int(gen, (n, c, h, w), "ends")
    d = halves_int(gen, (n, o, h, w), "ends")
    chunk_bytes = 4 * k * (2 * block + 1)  # what makes blocks of ``block`` channels
    for chunk in (chunk_bytes, 2**22):
        got = int16_gemm.conv_weight_grad(d, x, (3, 3), (1, 1), (1, 1), chunk)
        assert_same(got, REF.conv2d_backward_weight(d, x, 3, 1, 1))


@pytest.mark.parametrize("chunk_bytes", [1, 2**16, 2**22])
def test_int16_weight_grad_adds_int32_products_up_to_the_bound(chunk_bytes):
    """The halves' int32 products of successive chunks are added in int32 up to INT32_REDUCTION
    rows, then combined: at -32768 everywhere every half product is 2**14, and 40 samples of 4096
    positions (163,840 rows) need two int32 runs whatever the chunk size (1, 8 or 31 samples); in
    chunks of one sample the first run holds 31 (126,976 rows, sums of 2**14 * 126,976 < 2**31).
    Adding one more sample to that run, or never combining, wraps."""
    d = torch.full((40, 2, 64, 64), -32768, dtype=torch.int16)
    x = torch.full((40, 1, 64, 64), -32768, dtype=torch.int16)
    d[:, 1] = 32767  # the other end, in a second output channel
    got = int16_gemm.conv_weight_grad(d, x, (1, 1), (1, 1), (0, 0), chunk_bytes)
    assert_same(got, REF.conv2d_backward_weight(d, x, 1, 1, 0))
    assert int(got[0].max()) == 40 * 4096 * 2**30


def test_int16_weight_grad_refuses_more_positions_than_one_int32_product_takes():
    """A sample of more than INT32_REDUCTION output positions cannot be one int32 product: the
    halves' weight gradient refuses it, and the cpu backend takes another exact path."""
    side = 363  # 131,769 positions
    d = torch.full((1, 1, side, side), -32768, dtype=torch.int16)
    x = torch.full((1, 1, side, side), 32767, dtype=torch.int16)
    with pytest.raises(ValueError, match="output positions per sample"):
        int16_gemm.conv_weight_grad(d, x, (1, 1), (1, 1), (0, 0), 2**22)
    for cpu in HALVES_PATHS:
        assert_same(cpu.conv2d_backward_weight(d, x, 1, 1, 0), REF.conv2d_backward_weight(d, x, 1, 1, 0))


# ------------------------------------------- cpu products requantised straight from floats

@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_to_narrow_matches_requantize_at_every_bit_length(dtype, bits):
    """Every integer of bit length <= 18 (each bit length alone, so each shift), then for the
    longer ones up to the float's exact range: the extremes, every tie (k + 1/2) * 2**s near
    them and random values; for int8 and int16 results."""
    gen = torch.Generator().manual_seed(3)
    top = 24 if dtype == torch.float32 else 53
    for b in range(0, top + 1):
        m = 2**b - 1
        if b <= 18:
            v = torch.arange(-m, m + 1, dtype=torch.int64)
        else:
            s = max(b - (bits - 1), 1)
            ties = torch.arange(2**(bits - 1) - 9, 2**(bits - 1), dtype=torch.int64) * 2**s + 2**(s - 1)
            near = torch.tensor([m, m - 1, 2**(b - 1), 2**(b - 1) + 1, 2**s - 1, 2**s, 1, 0])
            rand = torch.randint(-m, m + 1, (4000,), generator=gen, dtype=torch.int64)
            v = torch.cat([ties[ties <= m], -ties[ties <= m], near, -near, rand])
        expected = requantize(v, torch.zeros((), dtype=torch.int64), bits=bits)
        values, shift = exact_to_narrow(v.to(dtype), bits=bits)
        assert_same(values, expected.v)
        assert_same(shift, expected.e)


@SETTINGS
@given(shape=conv_shapes(), dtypes=DTYPES, modes=st.tuples(MODES, MODES, MODES),
       seed=st.integers(0, 2**31 - 1), budget=BUDGETS)
def test_cpu_product_to_int8_matches_requantized_reference(shape, dtypes, modes, seed, budget):
    """Over shapes, int16 mixes and lowered budgets (float32 blocks, float64, int64 fall-back)."""
    n, c, o, h, w, kh, kw, s, p = shape
    gen, x, wt, d = _conv_operands(shape, dtypes, modes, seed)
    wl = rand_int(gen, (o, c * h * w), dtypes[1], modes[1])
    dl = rand_int(gen, (n, o), dtypes[0], modes[2])
    paths = cpu_budget(budget)
    for rectify in (False, True):  # a ReLU follows the forward products of most layers
        assert_requantized_same("conv2d_forward", x, wt, s, p, paths=paths, rectify=rectify)
        assert_requantized_same("linear_forward", x.flatten(1), wl, paths=paths, rectify=rectify)
    assert_requantized_same("conv2d_backward_input", d, wt, (h, w), s, p, paths=paths)
    assert_requantized_same("linear_backward_input", dl, wl, paths=paths)


def chunks_with_ties(gen: torch.Generator, bit_lengths, s: int, kept_bits: int) -> torch.Tensor:
    """Rows of int64 values, one per bit length b (at most 2**b - 1 in magnitude): random values,
    +-(2**b - 1), and the ties of a final shift s with their neighbours, one unit and one step of
    a chunk kept in ``kept_bits`` magnitude bits either side (where truncating first could round
    the wrong way); rows padded to one width by repeating their own values."""
    chunks = []
    for b in bit_lengths:
        m = 2**b - 1
        values = [torch.randint(-m, m + 1, (1000,), generator=gen, dtype=torch.int64), torch.tensor([m, -m])]
        for j in range(4):
            tie = (2 * j + 1) * 2**(s - 1)
            step = 2**max(b - kept_bits, 0)
            near = torch.tensor([tie - 1, tie, tie + 1, tie - step, tie + step - 1])
            near = near[(near > 0) & (near <= m)]
            values += [near, -near]
        chunks.append(torch.cat(values))
    width = max(len(c) for c in chunks)
    return torch.stack([torch.cat([c, c[:width - len(c)]]) for c in chunks])


@pytest.mark.parametrize("dtype", [torch.int32, torch.float32, torch.float64])
def test_requantize_chunks_matches_requantize_with_ties(dtype):
    """requantize_chunks against requantising the whole accumulator: chunks of very different
    sizes (so each keeps its int16 values with its own shift k), random values, and in every
    chunk the ties of the final shift s and their neighbours (where truncating to int16 first
    could round the wrong way if the proof were wrong)."""
    gen = torch.Generator().manual_seed(21)
    top = 31 if dtype == torch.int32 else 24
    s = top - 7
    full = chunks_with_ties(gen, [top, top - 3, 18, 16, 15, 12, 4], s, kept_bits=15)  # [7, width]
    expected = requantize(full, torch.zeros((), dtype=torch.int64))
    parts = ((i, full[i:i + 1].to(dtype)) for i in range(full.shape[0]))
    values, shift = requantize_chunks(full.shape[0], parts)
    assert int(shift) == int(expected.e) == s
    assert_same(values, expected.v)


def test_requantize_chunks_to_16_bits_matches_requantize_with_ties():
    """The same for 16-bit results of int64 chunks (DFP16's products on the int8 halves): chunks
    from 62 bits (the callers' bound) down to 4, each kept in int32 with its own shift k, the
    ties of the final shift s and their neighbours in each; and a batch small enough that s = 0
    (every value kept as it is, negative ones included)."""
    gen = torch.Generator().manual_seed(22)
    top = 62
    s = top - 15
    full = chunks_with_ties(gen, [top, top - 5, 40, 32, 31, 30, 16, 4], s, kept_bits=31)
    small = torch.randint(-32767, 32768, full.shape, generator=gen, dtype=torch.int64)
    small[0, :2] = torch.tensor([32767, -32767])
    for batch in (full, small):
        expected = requantize(batch, torch.zeros((), dtype=torch.int64), bits=16)
        buffer = torch.empty((1, batch.shape[1]), dtype=torch.int64)  # reused, as conv_chunks does

        def parts(batch=batch, buffer=buffer):
            for i in range(batch.shape[0]):
                yield i, buffer.copy_(batch[i:i + 1])

        values, shift = requantize_chunks(batch.shape[0], parts(), bits=16)
        assert int(shift) == int(expected.e) == (s if batch is full else 0)
        assert_same(values, expected.v)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=conv_shapes(max_c=6), modes=st.tuples(*[st.sampled_from(["uniform", "ends"])] * 3),
       seed=st.integers(0, 2**31 - 1), n=st.integers(1, 9), i=st.integers(1, 200))
def test_cpu_product_to_int16_matches_requantized_reference(shape, modes, seed, n, i):
    """DFP16's products rounded to int16 by the cpu backend (a chunk at a time on the halves
    path, in chunks of one sample too; from the exact result on the float path) are the
    reference's accumulator requantised, values and shift."""
    nc, c, o, h, w, kh, kw, s, p = shape
    gen = torch.Generator().manual_seed(seed)
    ho, wo = (h + 2 * p[0] - kh) // s[0] + 1, (w + 2 * p[1] - kw) // s[1] + 1
    x, wt = halves_int(gen, (nc, c, h, w), modes[0]), halves_int(gen, (o, c, kh, kw), modes[1])
    d = halves_int(gen, (nc, o, ho, wo), modes[2])
    xl, wl = halves_int(gen, (n, i), modes[0]), halves_int(gen, (o, i), modes[1])
    cases = [("conv2d_forward", (x, wt, s, p)), ("conv2d_backward_input", (d, wt, (h, w), s, p)),
             ("linear_forward", (xl, wl))]
    for name, args in cases:
        expected = requantize(getattr(REF, name)(*args), torch.zeros((), dtype=torch.int64), bits=16)
        for cpu in HALVES_PATHS + (CPU,):
            values, shift = cpu.product_to_int16(name, *args)
            assert_same(values, expected.v)
            assert_same(shift, expected.e)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(shape=conv_shapes(max_c=6), modes=st.tuples(*[st.sampled_from(["uniform", "ends"])] * 3),
       seed=st.integers(0, 2**31 - 1), shifts=st.tuples(st.integers(0, 16), st.integers(0, 16)))
def test_headroom_shifts_applied_inside_the_products_are_shifting_first(shape, modes, seed, shifts):
    """DFP16's headroom shifts as the cpu backend applies them (on the halves path a chunk of
    samples at a time, in chunks of one sample too, as it splits the operands; elsewhere the whole
    operands first) give the reference's product of the shifted operands: requantised to int16
    for the forward and input-error convolutions, exact for the weight gradient; shifts 0 to 16
    (16 rounds every int16 to 0 or +-1), -32768 among the "ends"."""
    nc, c, o, h, w, kh, kw, s, p = shape
    gen = torch.Generator().manual_seed(seed)
    ho, wo = (h + 2 * p[0] - kh) // s[0] + 1, (w + 2 * p[1] - kw) // s[1] + 1
    x, wt = halves_int(gen, (nc, c, h, w), modes[0]), halves_int(gen, (o, c, kh, kw), modes[1])
    d = halves_int(gen, (nc, o, ho, wo), modes[2])
    zero = torch.zeros((), dtype=torch.int64)
    for name, args in (("conv2d_forward", (x, wt, s, p)), ("conv2d_backward_input", (d, wt, (h, w), s, p)),
                       ("conv2d_backward_weight", (d, x, (kh, kw), s, p))):
        shifted = (shift_operand(args[0], shifts[0]), shift_operand(args[1], shifts[1]), *args[2:])
        exact = getattr(REF, name)(*shifted)
        for cpu in HALVES_PATHS + (CPU,):
            assert_same(cpu.shifted_product(name, args, shifts), exact)
            if name != "conv2d_backward_weight":
                expected = requantize(exact, zero, bits=16)
                values, shift = cpu.product_to_int16(name, *args, shifts=shifts)
                assert_same(values, expected.v)
                assert_same(shift, expected.e)


@pytest.mark.parametrize("shifts", [(1, 0), (0, 2), (3, 1)])
def test_product_to_int8_applies_operand_shifts(shifts):
    """``product_to_int8`` takes the same ``shifts`` (int8 products get none from the layers, but
    the argument means the same): every cpu path, whole or a chunk of samples at a time, gives
    the reference's product of the shifted operands, requantised; -128 in every operand."""
    gen = torch.Generator().manual_seed(sum(shifts))
    x = torch.randint(-128, 128, (5, 3, 7, 7), generator=gen).to(torch.int8)
    wt = torch.randint(-128, 128, (4, 3, 3, 3), generator=gen).to(torch.int8)
    d = torch.randint(-128, 128, (5, 4, 7, 7), generator=gen).to(torch.int8)
    x[0, 0, 0, 0], wt[0, 0, 0, 0], d[0, 0, 0, 0] = -128, -128, -128
    chunked = CpuBackend(CpuSettings(float_chunk_bytes=1))
    for name, args in (("conv2d_forward", (x, wt, 1, 1)), ("conv2d_backward_input", (d, wt, (7, 7), 1, 1))):
        shifted = (shift_operand(args[0], shifts[0]), shift_operand(args[1], shifts[1]), *args[2:])
        expected = requantize(getattr(REF, name)(*shifted), torch.zeros((), dtype=torch.int64))
        for cpu in (CPU, CPU_INT8, CPU_DIRECT, chunked):
            values, shift = cpu.product_to_int8(name, *args, shifts=shifts)
            assert_same(values, expected.v)
            assert_same(shift, expected.e)


def _rectified_worst_cases():
    """(name, args) of products whose rectified scale is not the plain one: the largest magnitude
    negative by far, everything negative, and the extremes (-128 included) at long reductions."""
    k = 4096  # 128 * 128 * 4096 = 2**26: far past the int16 a chunk is kept in
    gen = torch.Generator().manual_seed(5)
    x = torch.full((3, k), -128, dtype=torch.int8)
    x[1] = torch.randint(-128, 128, (k,), generator=gen).to(torch.int8)
    x[2] = 1
    w = torch.randint(-3, 4, (4, k), generator=gen).to(torch.int8)
    w[0], w[1] = 127, -63  # x[0] @ w[0] = -128 * 127 * k (26 bits), x[0] @ w[1] = +128 * 63 * k (25)
    w_negative = torch.full((2, k), 127, dtype=torch.int8)  # with x[0] and x[2] = -1: all negative
    xc = torch.full((2, 64, 9, 9), 127, dtype=torch.int8)
    xc[0, :, 0, 0] = -128
    wc = torch.full((3, 64, 3, 3), -127, dtype=torch.int8)  # 64 * 9 terms: mostly -127 * 127
    wc[1, :, 1, 1] = 1
    wc[2] = torch.randint(-128, 128, (64, 3, 3), generator=torch.Generator().manual_seed(6)).to(torch.int8)
    return [("linear_forward", (x, w)), ("linear_forward", (torch.cat([x[:1], -x[2:]]), w_negative)),
            ("conv2d_forward", (xc, wc, 1, 1)), ("conv2d_forward", (xc[:, :2], wc[:, :2], 2, 0))]


@pytest.mark.parametrize("case", range(4))
def test_rectified_products_round_the_positive_part_on_every_path(case):
    """A ReLU's layer (``rectify``): every cpu path (whole, one sample per chunk, int8 GEMM, direct
    first-layer convolutions), the reference and the cuda backend's generic rounding give the
    bits of requantising ``max(y, 0)`` of the reference product, on products where that changes
    the scale."""
    name, args = _rectified_worst_cases()[case]
    exact = getattr(REF, name)(*args)
    expected = requantize(exact.clamp(min=0), torch.zeros((), dtype=torch.int64))
    assert int(expected.e) < int(requantize(exact, torch.zeros((), dtype=torch.int64)).e) or case == 1
    if case == 1:
        assert int(exact.max()) < 0 and not expected.v.any() and int(expected.e) == 0
    chunked = CpuBackend(CpuSettings(float_chunk_bytes=1))
    assert_requantized_same(name, *args, paths=(CPU, CPU_INT8, CPU_DIRECT, chunked), rectify=True)
    for backend in (REF, INT_MM):
        got = requantize_product(backend, name, args, torch.zeros((), dtype=torch.int64), rectify=True)
        assert_same(got.v, expected.v)
        assert_same(got.e, expected.e)


def test_cpu_product_to_int16_never_makes_the_whole_int64_result(monkeypatch):
    """On the halves path DFP16's convolutions are rounded a chunk at a time
    (``int16_gemm.conv_chunks``): the whole int64 accumulator (``int16_gemm.conv``, 64 MiB for
    VGG-small-7's 128-channel layers at batch 64) is never made, and the values are requantize's."""
    gen = torch.Generator().manual_seed(9)
    x = halves_int(gen, (3, 40, 6, 6), "uniform")
    wt = halves_int(gen, (40, 40, 3, 3), "uniform")
    d = halves_int(gen, (3, 40, 6, 6), "uniform")
    cases = [("conv2d_forward", (x, wt, 1, 1)), ("conv2d_backward_input", (d, wt, (6, 6), 1, 1))]
    expected = [requantize(getattr(REF, name)(*args), torch.zeros((), dtype=torch.int64), bits=16)
                for name, args in cases]
    chunked = []
    real_chunks = int16_gemm.conv_chunks
    monkeypatch.setattr(int16_gemm, "conv", lambda *a, **k: pytest.fail("the whole int64 result was made"))
    monkeypatch.setattr(int16_gemm, "conv_chunks", lambda *a, **k: chunked.append(1) or real_chunks(*a, **k))
    for (name, args), want in zip(cases, expected):
        values, shift = CPU_INT8.product_to_int16(name, *args)
        assert_same(values, want.v)
        assert_same(shift, want.e)
    assert len(chunked) == 2


@pytest.mark.skipif(not native.available(), reason="numeric/native.c not built here")
@pytest.mark.parametrize("chunk_bytes", [2**22, 2**12])
def test_cpu_first_layers_take_the_direct_convolutions(chunk_bytes, monkeypatch):
    """Stride-1 convolutions of int8 operands with at most 32 products per output (LeNet-5's first
    layer, 1 -> 6 channels at 5x5; VGG's and ResNet's, 3 channels at 3x3) run forward and weight
    gradient on the direct C kernels under the default settings, requantised whole or a chunk of
    samples at a time, with the reference's bits; -128 everywhere in one sample. Strided ones,
    wider ones and a backend with the kernels switched off take another path."""
    taken = []
    for name in ("conv_direct_forward", "conv_direct_weight_grad"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _real=real, _name=name: taken.append(_name) or _real(*a))
    backend = CpuBackend(CpuSettings(float_chunk_bytes=chunk_bytes))
    gen = torch.Generator().manual_seed(17)
    for c, o, k, pad in ((1, 6, 5, 2), (3, 16, 3, 1)):
        x = torch.randint(-128, 128, (5, c, 12, 12), generator=gen).to(torch.int8)
        wt = torch.randint(-128, 128, (o, c, k, k), generator=gen).to(torch.int8)
        d = torch.randint(-128, 128, (5, o, 12, 12), generator=gen).to(torch.int8)
        x[1], wt[0], d[1] = -128, -128, -128
        taken.clear()
        assert_requantized_same("conv2d_forward", x, wt, 1, pad, paths=(backend,))
        both("conv2d_forward", x, wt, 1, pad, paths=(backend,))
        both("conv2d_backward_weight", d, x, k, 1, pad, paths=(backend,))
        assert taken == ["conv_direct_forward"] * (2 if chunk_bytes == 2**22 else 5 + 1) + ["conv_direct_weight_grad"]
        taken.clear()
        both("conv2d_forward", x, wt, 2, pad, paths=(backend,))
        both("conv2d_forward", x.repeat(1, 4, 1, 1), wt.repeat(1, 4, 1, 1), 1, pad, paths=(backend,))
        both("conv2d_forward", x, wt, 1, pad, paths=(CPU,))
        assert taken == []


def test_cpu_product_to_int8_rejects_other_products():
    with pytest.raises(ValueError, match="product_to_int8 takes one of"):
        CPU.product_to_int8("conv2d_backward_weight", torch.zeros(1, 1, 1, 1, dtype=torch.int8),
                            torch.zeros(1, 1, 1, 1, dtype=torch.int8), 1)


# ------------------------------------------------- cuda (torch._int_mm) == reference, on CPU

def int_mm_same(name: str, *args, backend: CudaBackend = INT_MM) -> None:
    assert_same(getattr(backend, name)(*args), getattr(REF, name)(*args))


@SETTINGS
@given(shape=conv_shapes(max_c=12), dtypes=DTYPES, modes=st.tuples(MODES, MODES, MODES),
       seed=st.integers(0, 2**31 - 1), reduction=st.sampled_from([INT32_REDUCTION, 8, 24]))
def test_int_mm_conv_matches_reference(shape, dtypes, modes, seed, reduction):
    """Every shape, stride and padding; two int16 operands as int8 halves, mixes to the
    reference; a shortened int32 piece length (8, 24) makes the weight gradient add many pieces
    in int64."""
    backend = CudaBackend(int32_terms=reduction)
    n, c, o, h, w, kh, kw, s, p = shape
    gen = torch.Generator().manual_seed(seed)
    ho, wo = (h + 2 * p[0] - kh) // s[0] + 1, (w + 2 * p[1] - kw) // s[1] + 1
    x = rand_int(gen, (n, c, h, w), dtypes[0], modes[0])
    wt = rand_int(gen, (o, c, kh, kw), dtypes[1], modes[1])
    d = rand_int(gen, (n, o, ho, wo), dtypes[0], modes[2])
    int_mm_same("conv2d_forward", x, wt, s, p, backend=backend)
    int_mm_same("conv2d_backward_input", d, wt, (h, w), s, p, backend=backend)
    int_mm_same("conv2d_backward_weight", d, x, (kh, kw), s, p, backend=backend)


@SETTINGS
@given(n=st.integers(1, 40), i=st.integers(1, 300), o=st.integers(1, 20), dtypes=DTYPES,
       modes=st.tuples(MODES, MODES, MODES), seed=st.integers(0, 2**31 - 1))
def test_int_mm_linear_matches_reference(n, i, o, dtypes, modes, seed):
    """Batch 1, sizes that are not multiples of 8 and fewer than 17 rows: all padded."""
    gen = torch.Generator().manual_seed(seed)
    x = rand_int(gen, (n, i), dtypes[0], modes[0])
    w = rand_int(gen, (o, i), dtypes[1], modes[1])
    d = rand_int(gen, (n, o), dtypes[0], modes[2])
    int_mm_same("linear_forward", x, w)
    int_mm_same("linear_backward_input", d, w)
    int_mm_same("linear_backward_weight", d, x)


def test_int_mm_int16_runs_on_int8_halves(halves_calls):
    """The cuda backend's int16 products are int16_gemm's (padded to CUDA's shape rules), exact at
    -32768 and 32767 over the longest reduction one int32 piece holds and one term past it, and
    for a padded, strided convolution's three products."""
    halves_calls.clear()
    for k in (INT32_REDUCTION, INT32_REDUCTION + 1):
        a = torch.full((2, k), -32768, dtype=torch.int16)
        b = torch.full((3, k), 32767, dtype=torch.int16)
        assert torch.equal(INT_MM.linear_forward(a, b), torch.full((2, 3), -32768 * 32767 * k, dtype=torch.int64))
    gen = torch.Generator().manual_seed(14)
    x, wt = halves_int(gen, (3, 5, 9, 9), "ends"), halves_int(gen, (4, 5, 3, 3), "ends")
    d = halves_int(gen, (3, 4, 5, 5), "ends")
    int_mm_same("conv2d_forward", x, wt, 2, 1)
    int_mm_same("conv2d_backward_input", d, wt, (9, 9), 2, 1)
    int_mm_same("conv2d_backward_weight", d, x, 3, 2, 1)
    assert halves_calls == ["mm"] * 5


def test_int_mm_chunks_of_the_batch():
    """Convolutions built a few samples at a time give the same result as in one piece."""
    gen = torch.Generator().manual_seed(12)
    x, wt = rand_int(gen, (7, 3, 9, 9), mode="extreme"), rand_int(gen, (5, 3, 3, 3))
    d = rand_int(gen, (7, 5, 9, 9), mode="sparse")
    small = CudaBackend(CudaSettings(chunk_bytes=300))
    int_mm_same("conv2d_forward", x, wt, 1, 1, backend=small)
    int_mm_same("conv2d_backward_input", d, wt, (9, 9), 1, 1, backend=small)
    int_mm_same("conv2d_backward_weight", d, x, 3, 1, 1, backend=small)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["uniform", "extreme", "sparse"])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16])
def test_int_mm_on_cuda_matches_reference_on_cpu(mode, dtype):
    """The int8 tensor-core path on a GPU (int16 operands as int8 halves), VGG-like and odd
    shapes, against the CPU reference."""
    gen = torch.Generator().manual_seed(13)
    cases = [((64, 32, 16, 16), (32, 32, 3, 3), 1, 1), ((3, 5, 7, 9), (6, 5, 3, 2), 2, 1),
             ((1, 512, 4, 4), (512, 512, 3, 3), 1, 1)]
    for xs, ws, s, p in cases:
        x, wt = rand_int(gen, xs, dtype, mode), rand_int(gen, ws, dtype, mode)
        y = REF.conv2d_forward(x, wt, s, p)
        d = rand_int(gen, tuple(y.shape), dtype, mode)
        on = [t.cuda() for t in (x, wt, d)]
        assert_same(INT_MM.conv2d_forward(on[0], on[1], s, p).cpu(), y)
        assert_same(INT_MM.conv2d_backward_input(on[2], on[1], xs[2:], s, p).cpu(),
                    REF.conv2d_backward_input(d, wt, xs[2:], s, p))
        assert_same(INT_MM.conv2d_backward_weight(on[2], on[0], ws[2:], s, p).cpu(),
                    REF.conv2d_backward_weight(d, x, ws[2:], s, p))
    xl, wl = rand_int(gen, (5, 8192), mode=mode), rand_int(gen, (10, 8192), mode=mode)
    assert_same(INT_MM.linear_forward(xl.cuda(), wl.cuda()).cpu(), REF.linear_forward(xl, wl))


def test_padded_products_hand_int_mm_the_layout_cublaslt_takes(monkeypatch):
    """The padded path (the cuda backend's, on every device) gives ``torch._int_mm`` a row-major
    first and a column-major second operand, whatever the operands' own layouts, with a column
    count divisible by 16: cuBLASLt refused two row-major int8 operands for most layer shapes, and
    odd multiples of 8 columns for some (H200, BENCHMARKS.md)."""
    int_mm, layouts = torch._int_mm, []

    def recording(a, b, *args, **kwargs):
        layouts.append((a.is_contiguous(), b.t().is_contiguous(), b.shape[1] % 16))
        return int_mm(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "_int_mm", recording)
    gen = torch.Generator().manual_seed(21)
    a, b = rand_int(gen, (88, 96), mode="extreme"), rand_int(gen, (96, 120), mode="extreme")
    for x, y in [(a, b), (a[:, :90], b[:90, :117]), (a.t().contiguous().t(), b.t().contiguous().t())]:
        assert_same(mm_int32(x, y), (x.double() @ y.double()).int())
    assert layouts == [(True, True, 0)] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows,terms,cols", [(88, 96, 120), (88, 64, 248), (784, 32, 64),
                                             (116032, 64, 576), (200704, 8, 32), (65536, 32, 128),
                                             (65536, 32, 264), (50176, 64, 264), (16384, 32, 584)])
def test_int_mm_on_cuda_takes_the_layer_shapes_cublaslt_refused(rows, terms, cols):
    """Products of LeNet-5, VGG-small-7 and ResNet-18 layers (int8, and DFP16's halves beside a
    column of ones) for which cuBLASLt answered CUBLAS_STATUS_NOT_SUPPORTED while the second
    operand was row-major or its column count an odd multiple of 8 (H200)."""
    gen = torch.Generator().manual_seed(rows + terms + cols)
    a = rand_int(gen, (rows, terms), mode="extreme")
    b = rand_int(gen, (terms, cols), mode="extreme")
    exact = (a.double() @ b.double()).int()  # |sums| <= 2**14 * 96: exact in float64
    assert_same(mm_int32(a.cuda(), b.cuda()).cpu(), exact)


def test_cpu_handles_minus_128_and_noncontiguous():
    gen = torch.Generator().manual_seed(3)
    x = rand_int(gen, (2, 40, 6, 6), mode="extreme")
    x[0, 0, 0, 0] = -128
    wt = torch.full((3, 40, 3, 3), -128, dtype=torch.int8)
    d = torch.full((2, 3, 4, 4), -128, dtype=torch.int8)
    both("conv2d_forward", x, wt)
    both("conv2d_backward_input", d, wt, (6, 6))
    both("conv2d_backward_weight", d, x, 3)
    xl = torch.full((64, 1500), -128, dtype=torch.int8)
    wl = torch.full((1500, 30), -128, dtype=torch.int8).t()  # non-contiguous view
    both("linear_forward", xl, wl)
    both("linear_backward_input", xl[:, :30], wl)
    both("linear_backward_weight", xl[:, :30], xl)
    # empty batch
    both("conv2d_forward", x[:0], wt)
    both("linear_forward", xl[:0], wl)
    # the weight gradient of an empty batch (an empty data-parallel shard): an empty reduction
    both("linear_backward_weight", xl[:0, :30], xl[:0])


@pytest.mark.parametrize("m,k,n", [(1, 1, 2), (2, 1, 1), (1, 3, 1), (3, 1, 4), (1, 5, 6), (6, 5, 1)])
def test_unpadded_int_mm_with_ambiguous_strides(m, k, n):
    """The cpu backend calls ``torch._int_mm`` without padding; a matrix with a size of 1 can have
    strides that fit row- and column-major alike (``w.t()`` of a [2, 1] weight: [1, 2], strides
    (1, 1)), on which ``_int_mm`` returned garbage until such operands were copied."""
    gen = torch.Generator().manual_seed(m * 100 + k * 10 + n)
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (k, n), generator=gen, dtype=torch.int8)
    expected = (a.to(torch.int64) @ b.to(torch.int64)).to(torch.int32)
    for a_view in (a, torch.as_strided(a.clone(), a.shape, (1, 1)) if 1 in a.shape else a.t().contiguous().t()):
        for b_view in (b, torch.as_strided(b.clone(), b.shape, (1, 1)) if 1 in b.shape else b.t().contiguous().t()):
            assert torch.equal(mm_int32(a_view, b_view, pad=False), expected)
            assert torch.equal(mm_int32(a_view, b_view, pad=True), expected)
    w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    x = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    both("linear_forward", x, w)


def test_cpu_reduced_float32_precision_falls_back_to_float64():
    """With TF32/BF16 allowed, float32 could be inexact: the backend must not use it."""
    gen = torch.Generator().manual_seed(4)
    x, wt, d = conv_case(gen, 2, 8, 4, 7, 7, 3, 3, (1, 1), (1, 1))
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        assert not B.fp32_is_strict()
        assert B.plan_blocks(100, [lambda: []], 1, 1, LIMITS)[0] == torch.float64
        both("conv2d_forward", x, wt, 1, 1)
        both("conv2d_backward_weight", d, x, 3, 1, 1)
        both("linear_forward", rand_int(gen, (5, 2000)), rand_int(gen, (3, 2000)))
    finally:
        torch.set_float32_matmul_precision(saved)
    assert B.fp32_is_strict()


def test_cpu_plan_blocks_worst_case():
    """All-127 conv at K = 512*9 needs ceil(4608 / 1040) = 5 float32 channel blocks."""
    w = torch.full((3, 512, 3, 3), 127, dtype=torch.int8)
    dt, blocks = B.plan_blocks(127 * 127 * 4608, [lambda: [B.L1Bound(127, B.weight_l1(w).t())]],
                               512, CpuSettings().max_f32_blocks_conv, LIMITS)
    assert dt == torch.float32 and len(blocks) == 5
    assert blocks[0] == (0, 115) and blocks[-1][1] == 512
    for c0, c1 in blocks:
        assert 127 * 127 * 9 * (c1 - c0) <= 2**24
    # a random weight has a much smaller L1 norm: one call
    gen = torch.Generator().manual_seed(5)
    w = rand_int(gen, (64, 512, 3, 3), mode="sparse")
    dt, blocks = B.plan_blocks(127 * 127 * 4608, [lambda: [B.L1Bound(127, B.weight_l1(w).t())]],
                               512, CpuSettings().max_f32_blocks_conv, LIMITS)
    assert dt == torch.float32 and len(blocks) <= 2


# ----------------------------------------------------------------------------- worst cases

SIGNS = ["plus", "minus", "alternating", "cancelling"]


def _pattern(kind: str, idx: torch.Tensor, which: str) -> torch.Tensor:
    """Sign patterns along a reduction index: 'alternating' gives both operands the same
    alternating sign (all products +127^2, maximal sum); 'cancelling' alternates only one
    operand, so the sum is 0 or +-127^2 while the partial sums are as large as they get."""
    if kind == "plus":
        return torch.ones_like(idx)
    if kind == "minus":
        return -torch.ones_like(idx) if which == "a" else torch.ones_like(idx)
    alt = 1 - 2 * (idx % 2)
    if kind == "alternating":
        return alt
    return alt if which == "a" else torch.ones_like(idx)


def _expected_linear_sum(kind: str, k: int) -> int:
    if kind in ("plus", "alternating"):
        return 127 * 127 * k
    if kind == "minus":
        return -127 * 127 * k
    return 127 * 127 * (k % 2)  # sum of (-1)^i for i < k


@pytest.mark.parametrize("k", [784, 4096])
@pytest.mark.parametrize("kind", SIGNS)
def test_worst_case_linear(k, kind):
    idx = torch.arange(k)
    a = (127 * _pattern(kind, idx, "a")).to(torch.int8)
    b = (127 * _pattern(kind, idx, "b")).to(torch.int8)
    expected = _expected_linear_sum(kind, k)
    x, w = a.expand(4, k).contiguous(), b.expand(3, k).contiguous()
    for be in ALL:
        y = be.linear_forward(x, w)
        assert y.dtype == torch.int32 and bool((y == expected).all())
        # backward-input: reduction over O = k
        gi = be.linear_backward_input(a.expand(2, k).contiguous(),
                                      b.view(k, 1).expand(k, 5).contiguous())
        assert gi.dtype == torch.int32 and bool((gi == expected).all())
        # weight gradient: reduction over the batch N = k
        gw = be.linear_backward_weight(a.view(k, 1).expand(k, 3).contiguous(),
                                       b.view(k, 1).expand(k, 6).contiguous())
        assert gw.dtype == torch.int32 and bool((gw == expected).all())
    assert_requantized_same("linear_forward", x, w)
    assert_requantized_same("linear_backward_input", a.expand(2, k).contiguous(),
                            b.view(k, 1).expand(k, 5).contiguous())


@pytest.mark.parametrize("k", [1024, 1025])
def test_plan_from_dtypes_at_its_boundary(k):
    """A product of int8 operands skips the data-dependent plan while 128 * 128 * K <= 2**24
    (``bounds.static_f32_plan``). At its boundary, all -128 but one product of 1 x 1: K = 1024
    sums to 2**24 - 2**14 + 1 (one float32 product is exact), K = 1025 to 2**24 + 1, which float32
    cannot hold, so the plan must come from the data there (a dtype bound taken as 127 would miss
    it). Linear forward and backward-input, convolution forward and backward-input (1x1 kernels,
    C or O = K)."""
    a = torch.full((k,), -128, dtype=torch.int8)
    a[-1] = 1
    expected = 128 * 128 * (k - 1) + 1
    assert (expected > F32_EXACT) == (k == 1025)
    x, w = a.expand(2, k).contiguous(), a.expand(3, k).contiguous()
    for be in ALL:
        assert bool((be.linear_forward(x, w).to(torch.int64) == expected).all())
        assert bool((be.linear_backward_input(x, w.t().contiguous()).to(torch.int64) == expected).all())
        conv_x, conv_w = x.view(2, k, 1, 1), w.view(3, k, 1, 1)
        assert bool((be.conv2d_forward(conv_x, conv_w, 1, 0).to(torch.int64) == expected).all())
        d, wb = x.view(2, k, 1, 1), a.view(k, 1, 1, 1).expand(k, 3, 1, 1).contiguous()
        assert bool((be.conv2d_backward_input(d, wb, (1, 1), 1, 0).to(torch.int64) == expected).all())
    assert (B.static_f32_plan(torch.int8, torch.int8, k, FloatLimits()) is not None) == (k == 1024)


@pytest.mark.parametrize("k", [2**23, 2**23 + 1])
def test_float64_plan_from_dtypes_at_its_boundary(k):
    """A product with an int16 operand goes to one float64 product without reading the data while
    32768 * 32768 * K <= 2**53 (``bounds.static_f64_plan``). At its boundary, all -32768 but one
    product of 1 x 1: K = 2**23 sums to 2**53 - 2**30 + 1 (exact in float64), K = 2**23 + 1 to
    2**53 + 1, which float64 cannot hold, so the plan must come from the data there. The cpu
    backend's float path (the halves path does not use floats), linear forward and a convolution
    with one 1x1 tap per input channel, and the weight gradient of a one-channel convolution over
    K positions."""
    a = torch.full((k,), -32768, dtype=torch.int16)
    a[-1] = 1
    expected = 32768 * 32768 * (k - 1) + 1
    assert (expected > F64_EXACT) == (k == 2**23 + 1)
    x = a.view(1, k)
    assert int(CPU.linear_forward(x, x)) == expected
    assert int(CPU.conv2d_forward(x.view(1, k, 1, 1), x.view(1, k, 1, 1), 1, 0)) == expected
    assert int(CPU.conv2d_backward_weight(x.view(1, 1, 1, k), x.view(1, 1, 1, k), 1, 1, 0)) == expected
    assert (B.static_f64_plan(torch.int16, torch.int16, k, FloatLimits()) is not None) == (k == 2**23)
    assert B.static_f64_plan(torch.int8, torch.int8, 4, FloatLimits()) is None


def _expected_conv_forward(kind, c, h, w, kh, kw, s, p, ho, wo):
    """Exact expected output of the 'channel pattern' worst case, with Python ints."""
    per_tap = _expected_linear_sum(kind, c)  # sum over channels of one kernel tap
    out = [[per_tap * valid_taps(a, kh, s, p, h) * valid_taps(b, kw, s, p, w)
            for b in range(wo)] for a in range(ho)]
    return torch.tensor(out, dtype=torch.int64)


@pytest.mark.parametrize("kind", SIGNS)
def test_worst_case_conv_forward_and_backward_input(kind):
    # C*kh*kw = 512*9 = 4608, the longest reduction of VGG-small.
    c, kh, kw, s, p, h, w = 512, 3, 3, 1, 1, 4, 5
    ci = torch.arange(c)
    x = (127 * _pattern(kind, ci, "a")).to(torch.int8).view(1, c, 1, 1).expand(2, c, h, w)
    wt = (127 * _pattern(kind, ci, "b")).to(torch.int8).view(1, c, 1, 1).expand(3, c, kh, kw)
    x, wt = x.contiguous(), wt.contiguous()
    exp = _expected_conv_forward(kind, c, h, w, kh, kw, s, p, h, w)
    for be in ALL:
        y = be.conv2d_forward(x, wt, s, p)
        assert y.dtype == torch.int32
        assert torch.equal(y.to(torch.int64), exp.expand(2, 3, h, w))
    # backward-input with O*kh*kw = 512*9: the same sums, with the roles of C and O swapped
    # (stride 1, pad 1, 3x3: the transposed kernel has the same valid-tap counts).
    d = (127 * _pattern(kind, ci, "a")).to(torch.int8).view(1, c, 1, 1).expand(2, c, h, w)
    wb = (127 * _pattern(kind, ci, "b")).to(torch.int8).view(c, 1, 1, 1).expand(c, 2, kh, kw)
    d, wb = d.contiguous(), wb.contiguous()
    for be in ALL:
        g = be.conv2d_backward_input(d, wb, (h, w), s, p)
        assert g.dtype == torch.int32
        assert torch.equal(g.to(torch.int64), exp.expand(2, 2, h, w))
    assert_requantized_same("conv2d_forward", x, wt, s, p)
    assert_requantized_same("conv2d_backward_input", d, wb, (h, w), s, p)


@pytest.mark.parametrize("kind", ["plus", "minus", "checker"])
def test_worst_case_conv_strided_checkerboard(kind):
    """Stride 2, padding 2, kernel 5 with signs (-1)^(c+h+w) and (-1)^(c+i+j): every product of
    an output has the same sign (-1)^((a+b)*s), so |sum| = 127^2 * (number of valid taps) * C."""
    c, kh, s, p, h = 185, 5, 2, 2, 9  # C*kh*kw = 4625
    ho = (h + 2 * p - kh) // s + 1
    ci, hi = torch.arange(c), torch.arange(h)
    if kind == "checker":
        x = ((-1) ** (ci.view(c, 1, 1) + hi.view(1, h, 1) + hi.view(1, 1, h))) * 127
        k = torch.arange(kh)
        wt = ((-1) ** (ci.view(c, 1, 1) + k.view(1, kh, 1) + k.view(1, 1, kh))) * 127
    else:
        sign = 1 if kind == "plus" else -1
        x = torch.full((c, h, h), 127 * sign)
        wt = torch.full((c, kh, kh), 127)
    x = x.to(torch.int8).unsqueeze(0).expand(2, c, h, h).contiguous()
    wt = wt.to(torch.int8).unsqueeze(0).expand(2, c, kh, kh).contiguous()
    exp = torch.tensor([[127 * 127 * c * valid_taps(a, kh, s, p, h) * valid_taps(b, kh, s, p, h)
                         * ((-1) ** ((a + b) * s) if kind == "checker" else
                            (1 if kind == "plus" else -1))
                         for b in range(ho)] for a in range(ho)], dtype=torch.int64)
    for be in ALL:
        y = be.conv2d_forward(x, wt, s, p)
        assert torch.equal(y.to(torch.int64), exp.expand(2, 2, ho, ho))


@pytest.mark.parametrize("kind", ["plus", "minus", "cancelling"])
def test_worst_case_conv_backward_weight_large_batch(kind):
    """Weight gradient reduced over batch*Ho*Wo = 256*32*32 = 262,144 terms: |G| up to
    127^2 * 262,144 ~ 4.2e9 > 2**31, so int64. Two channels keep it small in memory."""
    n, c, o, h, kh, s, p = 256, 2, 2, 32, 3, 1, 1
    d = torch.full((n, o, h, h), 127, dtype=torch.int8)
    x = torch.full((n, c, h, h), 127, dtype=torch.int8)
    if kind == "minus":
        x = -x
    elif kind == "cancelling":  # alternate the sign of whole samples
        d[1::2] = -127
    per_sample = {"plus": 1, "minus": -1, "cancelling": 0}[kind] * n
    exp = torch.tensor([[127 * 127 * per_sample * valid_taps(0, 1, 1, 0, 1)
                         * sum(1 for a in range(h) if 0 <= a + i - p < h)
                         * sum(1 for b in range(h) if 0 <= b + j - p < h)
                         for j in range(kh)] for i in range(kh)], dtype=torch.int64)
    if kind == "plus":
        assert int(exp.max()) > 2**31
    for be in ALL:  # on the int8 GEMM path: int32 pieces of at most 131,064 rows, added in int64
        g = be.conv2d_backward_weight(d, x, kh, s, p)
        assert g.dtype == torch.int64
        assert torch.equal(g, exp.expand(o, c, kh, kh))


@pytest.mark.parametrize("chunk_bytes", [1, 3000, 2**22])
def test_cpu_int8_gemm_in_chunks_and_channel_blocks(chunk_bytes):
    """Both paths of the cpu backend cut into chunks of samples (down to one) and, for weight
    gradients on the int8 GEMM path, blocks of output channels: weight gradients added in int32
    (short reductions) and in int64 (long), and products requantised from int16 chunks whose
    own shifts differ (samples of very different sizes: the first sample all +-127, the others
    small)."""
    paths = cpu_paths(replace(FLOAT_PATH, int8_gemm_chunk_bytes=chunk_bytes,
                              float_chunk_bytes=chunk_bytes))
    gen = torch.Generator().manual_seed(13)
    n, c, o, h = 5, 40, 24, 6
    x = rand_int(gen, (n, c, h, h), mode="uniform") // 9
    x[0] = rand_int(gen, (c, h, h), mode="extreme")
    wt = rand_int(gen, (o, c, 3, 3), mode="extreme")
    d = rand_int(gen, (n, o, h + 2, h + 2)) // 5
    d[2] = rand_int(gen, (o, h + 2, h + 2), mode="extreme")
    for pad in (0, 1, 2):
        size = h - 2 + 2 * pad
        dp = d[..., :size, :size]
        both("conv2d_backward_weight", dp, x, 3, 1, pad, paths=paths)
        assert_requantized_same("conv2d_forward", x, wt, 1, pad, paths=paths)
        assert_requantized_same("conv2d_backward_input", dp, wt, (h, h), 1, pad, paths=paths)
        both("conv2d_forward", x, wt, 1, pad, paths=paths)
        both("conv2d_backward_input", dp, wt, (h, h), 1, pad, paths=paths)
    big_d = torch.full((2, 2, 300, 300), 127, dtype=torch.int8)  # 180,000 terms: int64
    big_x = torch.full((2, 3, 300, 300), -127, dtype=torch.int8)
    both("conv2d_backward_weight", big_d, big_x, 1, 1, 0, paths=paths)


@pytest.mark.parametrize("hw, per_sample", [((26, 40), True), ((27, 39), False)])
@pytest.mark.parametrize("kind", ["plus", "minus", "cancelling"])
def test_worst_case_weight_grad_grouped_path(monkeypatch, hw, per_sample, kind):
    """The grouped path holds all +-127 operands at the longest per-sample reduction it takes,
    Ho*Wo = 1040 (127**2 * 1040 <= 2**24, one sample per group); at 1053 terms it hands over to
    the block plans."""
    n, c, o, k = 3, 1, 2, 3
    x = torch.full((n, c, *hw), -127 if kind == "minus" else 127, dtype=torch.int8)
    d = torch.full((n, o, *hw), 127, dtype=torch.int8)
    if kind == "cancelling":
        d[1] = -127
    taken = spy_on_grouped_weight_grad(monkeypatch)
    g = CPU.conv2d_backward_weight(d, x, k, 1, 1)
    assert taken == ([1] if per_sample else [])  # one sample per group at this length
    assert torch.equal(g, REF.conv2d_backward_weight(d, x, k, 1, 1))
    centre = {"plus": 1, "minus": -1, "cancelling": 1 / 3}[kind] * 127 * 127 * n * hw[0] * hw[1]
    assert int(g[0, 0, 1, 1]) == int(centre)


@pytest.mark.parametrize("n", [1, 7, 20, 256])
def test_worst_case_weight_grad_groups_of_samples(monkeypatch, n):
    """LeNet-5's second convolution with all +-127 operands, sent down the grouped path (it
    takes the sample blocks by default): groups of floor(2**24 / (127**2 * 100)) = 10 samples
    (the last one padded with zero samples), exact at the group bound."""
    cpu = CpuBackend(replace(FLOAT_PATH, grouped_max_columns=150))
    x = torch.full((n, 6, 14, 14), 127, dtype=torch.int8)
    d = torch.full((n, 16, 10, 10), -127, dtype=torch.int8)
    d[::3] = 127
    taken = spy_on_grouped_weight_grad(monkeypatch)
    g = cpu.conv2d_backward_weight(d, x, 5, 1, 0)
    assert taken == [min(n, 10)]
    assert torch.equal(g, REF.conv2d_backward_weight(d, x, 5, 1, 0))
    plus = len(range(0, n, 3))
    assert int(g[0, 0, 0, 0]) == 127 * 127 * 100 * (plus - (n - plus))


@pytest.mark.parametrize("chunk_bytes", [1, 5000, 64 * 2**20])
def test_grouped_weight_grad_wide_layer_in_chunks(monkeypatch, chunk_bytes):
    """A wide convolution (C*kh*kw = 288) takes the grouped path when its groups are small
    enough (here groups of 4 samples, with the limit raised to 4) and its block plan is not short
    (here: any plan), built a chunk of groups at a time; exact for any chunk size."""
    gen = torch.Generator().manual_seed(11)
    x = rand_int(gen, (7, 32, 16, 16), mode="extreme")
    d = rand_int(gen, (7, 4, 16, 16), mode="extreme")
    tuned = replace(FLOAT_PATH, grouped_chunk_bytes=chunk_bytes, grouped_max_samples=4,
                    grouped_min_blocks=0)
    taken = spy_on_grouped_weight_grad(monkeypatch)
    both("conv2d_backward_weight", d, x, 3, 1, 1, paths=cpu_paths(tuned))
    md, mx = int(d.abs().max()), int(x.abs().max())
    assert taken == [min(7, F32_EXACT // (md * mx * 256))]  # the float path's only
    assert taken[0] <= tuned.grouped_max_samples


def test_random_large_reductions_cpu_matches_reference():
    """Realistic value distributions at VGG-sized reductions (blocks or not, must match)."""
    gen = torch.Generator().manual_seed(6)
    x = rand_int(gen, (2, 512, 4, 4))
    wt = rand_int(gen, (8, 512, 3, 3))
    d = rand_int(gen, (2, 8, 4, 4), mode="sparse")
    both("conv2d_forward", x, wt, 1, 1)
    both("conv2d_backward_weight", d, x, 3, 1, 1)
    d2 = rand_int(gen, (2, 512, 4, 4))
    w2 = rand_int(gen, (512, 8, 3, 3), mode="extreme")
    both("conv2d_backward_input", d2, w2, (4, 4), 1, 1)
    xl, wl = rand_int(gen, (16, 4096), mode="extreme"), rand_int(gen, (10, 4096))
    both("linear_forward", xl, wl)
    both("linear_backward_weight", rand_int(gen, (16, 10)), xl)


@SETTINGS
@given(shape=conv_shapes(max_c=5), modes=st.tuples(MODES, MODES, MODES),
       seed=st.integers(0, 2**31 - 1))
def test_cpu_bounds_really_bound_the_sum_of_absolute_products(shape, modes, seed):
    """The exactness proof rests on S = sum |a_k b_k| <= each bound the cpu backend uses.
    S itself is computed exactly by the reference on |a|, |b| (int16 holds 127 and 128)."""
    n, c, o, h, w, kh, kw, s, p = shape
    gen = torch.Generator().manual_seed(seed)
    ho = (h + 2 * p[0] - kh) // s[0] + 1
    wo = (w + 2 * p[1] - kw) // s[1] + 1
    x = rand_int(gen, (n, c, h, w), mode=modes[0])
    wt = rand_int(gen, (o, c, kh, kw), mode=modes[1])
    d = rand_int(gen, (n, o, ho, wo), mode=modes[2])
    ax, aw, ad = (t.to(torch.int16).abs() for t in (x, wt, d))
    mx, md = B.absmax(x), B.absmax(d)
    lw = B.weight_l1(wt)  # [O, C]
    # forward: S[n, o, ., .] <= max|x| * sum_{c,i,j} |w[o]|
    s_fwd = REF.conv2d_forward(ax, aw, s, p).to(torch.int64)
    assert bool((s_fwd <= mx * lw.sum(1).view(1, o, 1, 1)).all())
    # backward-input: S[n, c, ., .] <= max|d| * sum_{o,i,j} |w[:, c]|
    s_bi = REF.conv2d_backward_input(ad, aw, (h, w), s, p).to(torch.int64)
    assert bool((s_bi <= md * lw.sum(0).view(1, c, 1, 1)).all())
    # window bounds, per channel of the activation side (blocks are sums of channels):
    # forward S[n, o] from input channel k <= max|w| * window_l1(x)[k];
    # backward-input S[n, c] from error channel k <= max|w| * window_l1(d)[k].
    mw = B.absmax(wt)
    win_x = B.window_l1(x, (kh, kw), mx, LIMITS)[:, 0]
    win_d = B.window_l1(d, (kh, kw), md, LIMITS)[:, 0]
    for k in range(c):
        part = REF.conv2d_forward(ax[:, k:k + 1], aw[:, k:k + 1], s, p)
        assert int(part.max()) <= mw * int(win_x[k])
    for k in range(o):
        part = REF.conv2d_backward_input(ad[:, k:k + 1], aw[k:k + 1], (h, w), s, p)
        assert int(part.max()) <= mw * int(win_d[k])
    # weight gradient: L1 and Cauchy-Schwarz bounds per (o, c)
    s_bw = REF.conv2d_backward_weight(ad, ax, (kh, kw), s, p)
    ld = B.rows_l1(d, (2, 3), md, ho * wo, LIMITS).sum(0)  # [O]
    lx = B.rows_l1(x, (2, 3), mx, h * w, LIMITS).sum(0)  # [C]
    sd = B.rows_sq(d, md, LIMITS).sum(0)
    sx = B.rows_sq(x, mx, LIMITS).sum(0)
    assert bool((s_bw <= mx * ld.view(o, 1, 1, 1)).all())
    assert bool((s_bw <= md * lx.view(1, c, 1, 1)).all())
    assert bool((s_bw * s_bw <= sd.view(o, 1, 1, 1) * sx.view(1, c, 1, 1)).all())


def test_cpu_weight_grad_blocks_with_cauchy_schwarz():
    """Dense, heavy-tailed errors and activations: the L1 bound alone wants more blocks than the
    Cauchy-Schwarz bound; the plan uses the better one, and the result is exact."""
    gen = torch.Generator().manual_seed(7)
    n, c, o, h = 64, 3, 4, 28
    x = (torch.randn(n, c, h, h, generator=gen).relu() * 30).round().clamp(max=127)
    x.view(-1)[0] = 127
    x = x.to(torch.int8)
    d = (torch.randn(n, o, h, h, generator=gen) * 28).round().clamp(-127, 127).to(torch.int8)
    md, mx = B.absmax(d), B.absmax(x)
    l1 = [B.L1Bound(mx, B.rows_l1(d, (2, 3), md, h * h, LIMITS)),
          B.L1Bound(md, B.rows_l1(x, (2, 3), mx, h * h, LIMITS))]
    cs = [B.CSBound(B.rows_sq(d, md, LIMITS), B.rows_sq(x, mx, LIMITS))]
    b_l1 = B.greedy_blocks(l1, n, F32_EXACT, None)
    b_cs = B.greedy_blocks(l1 + cs, n, F32_EXACT, None)
    assert len(b_cs) < len(b_l1)
    both("conv2d_backward_weight", d, x, 5, 1, 2)


def test_cpu_window_bound_saves_blocks_for_sparse_errors():
    """Sparse large errors against dense worst-case weights (VGG's last layers late in a step):
    the weight-side L1 bound splits the 512 error channels into blocks, the window bound on the
    errors proves one float32 call exact; the result matches the reference."""
    gen = torch.Generator().manual_seed(12)
    n, o, c, h = 4, 512, 6, 8
    d = rand_int(gen, (n, o, h, h), mode="extreme")
    d = d * (torch.rand(d.shape, generator=gen) < 0.01)
    wt = rand_int(gen, (o, c, 3, 3), mode="extreme")
    md, mw = B.absmax(d), B.absmax(wt)
    by_weights = B.greedy_blocks([B.L1Bound(md, B.weight_l1(wt))], o, F32_EXACT, None)
    by_window = B.greedy_blocks([B.L1Bound(mw, B.window_l1(d, (3, 3), md, LIMITS))], o,
                                F32_EXACT, None)
    assert len(by_weights) > 1 and len(by_window) == 1
    both("conv2d_backward_input", d, wt, (h, h), 1, 1)
    both("conv2d_forward", d, wt.transpose(0, 1).contiguous(), 1, 1)


def test_cpu_weight_grad_split_path(monkeypatch):
    """Dense uniform errors at LeNet conv1 size: the sample-block plan is long, the backend
    splits d = 16*dh + dl; exact either way."""
    gen = torch.Generator().manual_seed(8)
    n, c, o, h = 64, 1, 6, 28
    x = rand_int(gen, (n, c, h, h))
    d = rand_int(gen, (n, o, h, h))
    # this test is about the sample-block plans
    tuned = replace(FLOAT_PATH, grouped_max_columns=0, grouped_max_samples=0)
    calls = []
    real = weight_grad.WeightGradPlanner.plan
    monkeypatch.setattr(weight_grad.WeightGradPlanner, "plan",
                        lambda *a: calls.append(real(*a)) or calls[-1])
    both("conv2d_backward_weight", d, x, 5, 1, 2, paths=cpu_paths(tuned))
    # the direct plan (more than split_min_blocks float32 blocks, or float64), then the halves
    assert len(calls) == 3
    direct, hi, lo = calls
    assert direct[1] != torch.float32 or len(direct[2]) > tuned.split_min_blocks
    assert hi[1] == lo[1] == torch.float32
    assert direct[1] != torch.float32 or len(hi[2]) + len(lo[2]) < len(direct[2])


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(5, 24), c=st.integers(1, 3), o=st.integers(1, 3), hw=st.integers(3, 9),
       k=st.integers(1, 3), s=st.integers(1, 2), p=st.integers(0, 1),
       modes=st.tuples(MODES, MODES), seed=st.integers(0, 2**31 - 1),
       budget=st.sampled_from([2**15, 2**17, 2**19]))
def test_cpu_weight_grad_many_blocks_matches_reference(n, c, o, hw, k, s, p, modes, seed, budget):
    gen = torch.Generator().manual_seed(seed)
    ho = (hw + 2 * p - k) // s + 1
    x = rand_int(gen, (n, c, hw, hw), mode=modes[0])
    d = rand_int(gen, (n, o, ho, ho), mode=modes[1])
    both("conv2d_backward_weight", d, x, k, s, p,
         paths=cpu_budget(budget, max_blocks=16, grouped=False))


def test_reference_elementwise_matmul_path(monkeypatch):
    """Off CPU the reference multiplies-and-sums in int64 (no integer matmul on CUDA); check
    that path on CPU against the matmul path, including chunking."""
    gen = torch.Generator().manual_seed(9)
    a = rand_int(gen, (37, 300), torch.int16).to(torch.int64)
    b = rand_int(gen, (300, 11), torch.int16).to(torch.int64)
    assert torch.equal(REF._mm64(a, b, elementwise=True), REF._mm64(a, b, elementwise=False))
    monkeypatch.setattr(REF, "_CHUNK_ELEMS", 500)  # forces row and column chunks
    assert torch.equal(REF._mm64(a, b, elementwise=True), a @ b)
    x, wt, d = conv_case(gen, 2, 3, 4, 9, 8, 3, 3, (2, 2), (1, 1))
    want = (REF.conv2d_forward(x, wt, 2, 1), REF.conv2d_backward_input(d, wt, (9, 8), 2, 1),
            REF.conv2d_backward_weight(d, x, 3, 2, 1))
    real = REF._mm64
    monkeypatch.setattr(REF, "_mm64", lambda a, b: real(a, b, elementwise=True))
    got = (REF.conv2d_forward(x, wt, 2, 1), REF.conv2d_backward_input(d, wt, (9, 8), 2, 1),
           REF.conv2d_backward_weight(d, x, 3, 2, 1))
    for g_, w_ in zip(got, want):
        assert_same(g_, w_)


@pytest.mark.parametrize("value", [-128, 127, -127])
def test_requantized_worst_case_at_the_longest_int32_reduction(value):
    """All operands ``value`` at K = 131,071 (the longest int8 reduction int32 holds): the sum
    value**2 * K (2**31 - 2**14 for -128) requantises to the same int8 with shift 24 on every
    backend and path (nearest rounding of the exact sum, clipped to 127), through requantize_product as the layers call it (the reference and cuda backends
    used to wrap the rounding constant and give -127)."""
    k = 131071
    expected = min((value * value * k + 2**23) >> 24, 127)  # 128 clips to 127 for -128; 126 else
    e = torch.zeros((), dtype=torch.int64)
    x = torch.full((2, k), value, dtype=torch.int8)
    w = torch.full((3, k), value, dtype=torch.int8)
    xc = x[:1].view(1, k, 1, 1)  # a 1x1 convolution over k channels, one pixel
    wc = w.view(3, k, 1, 1)
    dc = torch.full((1, k, 1, 1), value, dtype=torch.int8)
    calls = [("linear_forward", (x, w)), ("linear_backward_input", (x, w.t().contiguous())),
             ("conv2d_forward", (xc, wc, 1, 0)),
             ("conv2d_backward_input", (dc, wc.transpose(0, 1).contiguous(), (1, 1), 1, 0))]
    for backend in ALL:
        for name, args in calls:
            q = requantize_product(backend, name, args, e)
            assert int(q.e) == 24, (backend, name)
            assert bool((q.v == expected).all()), (backend, name, q.v.flatten()[:4].tolist())


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64])
def test_requantize_chunks_of_channels_last_chunks(dtype):
    """Chunks delivered channels-last (the int8 GEMM's [n, Ho, Wo, O] products seen as
    [n, O, Ho, Wo]), at magnitudes from 2**31 - 1 down to below 2**15, with every tie of the
    final shift and its neighbours, of both signs: the int8 values equal requantize's, and they
    come back channels-last (no transposing copy)."""
    gen = torch.Generator().manual_seed(5)
    full = torch.randint(-2**20, 2**20, (6, 3, 4, 5), generator=gen, dtype=torch.int64)
    top = 2**31 - 1
    s = 31 - 7
    flat = full.view(-1)
    ties = [(2 * j + 1) * 2**(s - 1) + d for j in range(3) for d in (-1, 0, 1)]
    flat[:2] = torch.tensor([top, -top])
    flat[2:2 + 2 * len(ties)] = torch.tensor(ties + [-t for t in ties])
    full[4:] //= 2**17  # a chunk whose own k is 0
    full[4, 0, 0, :2] = torch.tensor([-2**15 + 1, 2**15 - 1])
    expected = requantize(full, torch.zeros((), dtype=torch.int64))

    def chunks():
        for n0 in range(0, 6, 2):
            part = full[n0:n0 + 2].permute(0, 2, 3, 1).contiguous().to(dtype)  # [n, H, W, C]
            yield n0, part.permute(0, 3, 1, 2)

    values, shift = requantize_chunks(6, chunks())
    assert int(shift) == int(expected.e) == s
    assert_same(values, expected.v)
    assert values.is_contiguous(memory_format=torch.channels_last)
    small = torch.randint(-127, 128, (2, 3, 4, 5), generator=gen)  # s = 0: the values themselves
    values, shift = requantize_chunks(2, [(0, small.to(dtype).contiguous(memory_format=torch.channels_last))])
    assert int(shift) == 0 and torch.equal(values.to(torch.int64), small)


@pytest.mark.parametrize("value", [127, -128])
@pytest.mark.parametrize("k, s, p, h", [(3, 2, 1, 7), (3, 2, 1, 8), (1, 2, 0, 7), (3, 3, 0, 11), (5, 2, 2, 9)])
def test_worst_case_strided_input_gradient(value, k, s, p, h):
    """The input gradient of strided convolutions (the int8 GEMM path spreads d by the stride),
    every operand ``value`` over O = 14,563 output channels (O*k*k up to 131,067 for k = 3, the
    longest int8 reduction), odd and even input sizes (rows the forward's floor dropped): every
    path and backend equals the reference, and so do the int8 values requantised from it."""
    o, c = (14563 if k == 3 else 4096), 2
    ho = (h + 2 * p - k) // s + 1
    d = torch.full((1, o, ho, ho), value, dtype=torch.int8)
    w = torch.full((o, c, k, k), value, dtype=torch.int8)
    expected = REF.conv2d_backward_input(d, w, (h, h), s, p)
    assert int(expected.abs().max()) >= 127 * 127 * o  # the sums are as large as the taps allow
    for be in ALL:
        assert_same(be.conv2d_backward_input(d, w, (h, h), s, p), expected)
    assert_requantized_same("conv2d_backward_input", d, w, (h, h), s, p)
