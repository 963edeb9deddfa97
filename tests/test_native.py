"""The C rounding kernels (``numeric.native``) give the PyTorch code's bits: for every input and
output type they take, every shift, random values and each type's extremes (its maximum and
minus it, ties, zero), through the public functions that use them (``requantize``,
``max_bit_length``, ``apply_update``, ``exact_to_narrow``) against the same functions with the
kernels switched off. A machine without a C compiler has no kernels to check: the build test
says so instead of passing."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

from intrain.kernels.cpu import exact_to_narrow
from intrain.methods.update import apply_update
from intrain.numeric import native, rng, wide
from intrain.numeric.accumulate import shift_operand
from intrain.numeric.qtensor import QTensor
from intrain.numeric.requant import requantize
from intrain.numeric.rounding import max_bit_length

INPUTS = (torch.int16, torch.int32, torch.int64)


def torch_only(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with the C kernels switched off: the PyTorch code's result."""
    with mock.patch.object(native, "library", lambda: None):
        return fn(*args, **kwargs)


@pytest.fixture(autouse=True, params=["one range", "split"])
def kernel_threads(request, monkeypatch):
    """Every test runs twice: each kernel in one call, and cut into three ranges run on threads
    (``native._threads``, native.c's ``IN_RANGES``) whatever the size, so the cut is checked
    against the PyTorch code too."""
    if request.param == "split":
        monkeypatch.setattr(native, "PARALLEL_MIN", 1)
        threads = torch.get_num_threads()
        torch.set_num_threads(3)
        yield
        torch.set_num_threads(threads)
    else:
        yield


def test_library_builds_where_there_is_a_compiler():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine: the PyTorch code runs instead (same bits)")
    assert native.available(), "cc is here but numeric/native.c did not build or load"


needs_native = pytest.mark.skipif(not native.available(), reason="numeric/native.c not built here")


def _openmp_expected() -> bool:
    """gcc (which emits calls to GNU OpenMP's entry points) and a PyTorch running on OpenMP: the
    kernels must then cut their work on PyTorch's team."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return False
    # `cc --version` need not say gcc (Debian's: "cc (Debian 12.2.0-...)"); `-v` names the compiler
    return "gcc version" in subprocess.run([compiler, "-v"], capture_output=True, text=True).stderr


def test_kernels_cut_their_work_on_pytorchs_openmp_team():
    if not _openmp_expected():
        pytest.skip("no gcc, or a PyTorch not on OpenMP: the kernels run on the calling thread (same bits)")
    assert native.openmp(), "native.c built without OpenMP, or its OpenMP build did not load"
    assert [native.library().intrain_team_size(t) for t in (1, 2, 3)] == [1, 2, 3]
    # bound to the runtime PyTorch made global, not to a second libgomp (scikit-learn's wheel
    # brings one, loaded privately, once the digits tests have run)
    runtime = ctypes.cast(ctypes.CDLL(None).omp_get_num_threads, ctypes.c_void_p).value
    assert native.library().intrain_openmp_entry() == runtime


def _extremes(dtype: torch.dtype, shift: int) -> torch.Tensor:
    """Each type's largest magnitudes, zero, one, and the ties and near-ties of ``shift``."""
    top = torch.iinfo(dtype).max if not dtype.is_floating_point else 2**53 - 1
    values = [0, 1, -1, top, -top, top - 1, -(top - 1)]
    if shift > 0:
        half = 2 ** (shift - 1)
        for k in (1, 3, 5, 2**10 + 1):
            for delta in (-1, 0, 1):
                v = k * half + delta
                if v <= top:
                    values += [v, -v]
    return torch.tensor(values, dtype=torch.int64).to(dtype)


def _random(dtype: torch.dtype, bits: int, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    limit = 2 ** bits - 1
    return torch.randint(-limit, limit + 1, (n,), generator=generator, dtype=torch.int64).to(dtype)


def _input_bits(dtype: torch.dtype) -> int:
    """Magnitude bits the callers may pass: int64 accumulators stay below 2**62."""
    if dtype.is_floating_point:
        return 53
    return min(torch.iinfo(dtype).bits - 1, 62)


@needs_native
@pytest.mark.parametrize("dtype", INPUTS + (torch.int8,))
def test_max_bit_length(dtype):
    for bits in range(0, _input_bits(dtype) + 1, 3):
        for a in (_random(dtype, bits, 1000, bits), _extremes(dtype, 0), torch.zeros(0, dtype=dtype)):
            assert native.max_abs(a) is not None
            assert int(max_bit_length(a)) == int(torch_only(max_bit_length, a))


@needs_native
@pytest.mark.parametrize("dtype", INPUTS)
@pytest.mark.parametrize("bits", (8, 16))
@pytest.mark.parametrize("mode", ("nearest", "stochastic"))
def test_requantize_every_shift(dtype, bits, mode):
    e = torch.tensor(-3, dtype=torch.int64)
    key = rng.derive_key(7, 11, 3, rng.STREAM_ROUNDING)
    top = _input_bits(dtype)
    if mode == "stochastic":
        top = min(top, 31 + bits - 1)  # longer shifts take the PyTorch path on both sides
    for length in range(0, top + 1):
        shift = max(length - (bits - 1), 0)
        for a in (_random(dtype, length, 3000, length), _extremes(dtype, shift)):
            a = a.clamp(-(2**length - 1), 2**length - 1) if length < _input_bits(dtype) else a
            a = a.reshape(-1, 3) if a.numel() % 3 == 0 else a
            out = torch.int8 if bits == 8 else torch.int16
            assert native.round_shift(a, shift, mode, 2 ** (bits - 1) - 1, out, key, 5) is not None
            fast = requantize(a, e, bits, mode, key, offset=5)
            slow = torch_only(requantize, a, e, bits, mode, key, offset=5)
            assert fast.v.dtype == slow.v.dtype and int(fast.e) == int(slow.e)
            assert torch.equal(fast.v, slow.v), (dtype, bits, mode, length)


@needs_native
def test_wide_requantize_every_shift():
    """DFP16's int32 masters from int64 sums (``numeric.wide.requantize``): every bit length up to
    the 62 bits its callers promise, so every shift to 31 bits, ties and extremes included."""
    e = torch.tensor(5, dtype=torch.int64)
    for length in range(0, 63):
        shift = max(length - wide.VALUE_BITS, 0)
        for a in (_random(torch.int64, length, 3000, length), _extremes(torch.int64, shift)):
            a = a.clamp(-(2**length - 1), 2**length - 1)
            assert native.round_shift(a, shift, "nearest", wide.LIMIT, torch.int32) is not None
            fast, slow = wide.requantize(a, e), torch_only(wide.requantize, a, e)
            assert fast.v.dtype == slow.v.dtype == torch.int32 and int(fast.e) == int(slow.e)
            assert torch.equal(fast.v, slow.v), length


@needs_native
@given(exps=st.tuples(st.integers(-100, 40), st.integers(-100, 40)), f=st.integers(-2**31 + 1, 2**31 - 1),
       zero=st.sampled_from(["neither", "a", "b", "both"]), negative=st.booleans(), seed=st.integers(0, 2**20))
@settings(max_examples=150, deadline=None)
def test_wide_add_and_scale(exps, f, zero, negative, seed):
    """DFP16's int32 masters and momentum (``numeric.wide``): add and scale by the C kernels give
    the PyTorch code's values and exponents: exponent gaps from 0 to 140 (left alignments up to 30
    bits, right ones past 62), all-zero operands, the largest values and factors, ties, and
    operands whose largest magnitudes are all negative (small positive values beside them)."""
    gen = torch.Generator().manual_seed(seed)
    top = 2**31 - 1
    values = []
    for _ in range(2):
        v = torch.randint(-top, top + 1, (300,), generator=gen, dtype=torch.int64)
        v[:6] = torch.tensor([top, -top, 0, 1, -1, 2**30])
        v[6:20] //= 2 ** torch.randint(0, 31, (14,), generator=gen)
        if negative:
            v = torch.where(v > 0, v // 2**20, v)
        values.append(v.to(torch.int32))
    a, b = values
    if zero in ("a", "both"):
        a = torch.zeros_like(a)
    if zero in ("b", "both"):
        b = torch.zeros_like(b)
    qa = QTensor(a, torch.tensor(exps[0], dtype=torch.int64))
    qb = QTensor(b, torch.tensor(exps[1], dtype=torch.int64))
    for fn, args in ((wide.add, (qa, qb)), (wide.scale, (qa, (f, exps[1])))):
        fast, slow = fn(*args), torch_only(fn, *args)
        assert fast.v.dtype == slow.v.dtype == torch.int32
        assert int(fast.e) == int(slow.e) and torch.equal(fast.v, slow.v)


@needs_native
def test_headroom_shift_of_every_int16_value():
    """DFP16's headroom shifts (``numeric.accumulate.shift_operand``) of all 65,536 int16 values,
    -32768 included, by every shift an int16 operand can take."""
    v = torch.arange(-32768, 32768, dtype=torch.int16)
    for shift in range(0, 17):
        assert shift == 0 or native.shift_int16(v, shift) is not None
        fast, slow = shift_operand(v, shift), torch_only(shift_operand, v, shift)
        assert fast.dtype == slow.dtype == torch.int16
        assert torch.equal(fast, slow), shift


@needs_native
@given(values=st.lists(st.integers(-(2**31 - 1), 2**31 - 1), min_size=1, max_size=200),
       offset=st.integers(0, 2**32 - 200), seed=st.integers(0, 2**20))
@settings(max_examples=150, deadline=None)
def test_stochastic_matches_the_counter_stream(values, offset, seed):
    """Noise of element i = stream position offset + i, as ``rng.uniform_bits`` draws it."""
    a = torch.tensor(values, dtype=torch.int32)
    key = rng.derive_key(seed, 1, 2, rng.STREAM_ROUNDING)
    e = torch.zeros((), dtype=torch.int64)
    fast = requantize(a, e, 8, "stochastic", key, offset=offset)
    slow = torch_only(requantize, a, e, 8, "stochastic", key, offset=offset)
    assert torch.equal(fast.v, slow.v) and int(fast.e) == int(slow.e)


@needs_native
@pytest.mark.parametrize("bits", (8, 16))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.int32, torch.int64))
def test_exact_to_narrow(dtype, bits):
    exact_bits = 24 if dtype == torch.float32 else _input_bits(dtype) if not dtype.is_floating_point else 53
    result = {8: torch.int8, 16: torch.int16}[bits]
    for length in range(0, exact_bits + 1):
        for a in (_random(torch.int64, length, 2000, length), _extremes(torch.int64, max(length - (bits - 1), 0))):
            a = a.clamp(-(2**length - 1), 2**length - 1).to(dtype)
            assert native.round_shift(a, 0, "nearest", 2 ** (bits - 1) - 1, result) is not None
            fast = exact_to_narrow(a.clone(), bits=bits)
            slow = torch_only(exact_to_narrow, a.clone(), bits=bits)
            assert fast[0].dtype == slow[0].dtype == result
            assert torch.equal(fast[0], slow[0]) and int(fast[1]) == int(slow[1]), (dtype, length)


@needs_native
@pytest.mark.parametrize("grad_dtype", (torch.int32, torch.int64))
@pytest.mark.parametrize("weight_dtype", (torch.int8, torch.int16))
def test_update(grad_dtype, weight_dtype):
    limit = torch.iinfo(weight_dtype).max
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-limit, limit + 1, (40, 25), generator=generator).to(weight_dtype)
    weight.view(-1)[:4] = torch.tensor([limit, -limit, limit, -limit])
    top = 30 if grad_dtype == torch.int32 else 40
    for length in range(0, top + 1):
        grad = _random(torch.int64, length, 1000, length).reshape(40, 25)
        grad.view(-1)[:4] = torch.tensor([2**length - 1, -(2**length - 1), -(2**length - 1), 2**length - 1])
        grad = grad.to(grad_dtype)
        assert native.update_pseudo(weight, grad, 0, limit) is not None
        for mu in (0, 1, 4, 12):
            fast = apply_update(weight, grad, mu)
            slow = torch_only(apply_update, weight, grad, mu)
            assert fast.dtype == slow.dtype == weight_dtype
            assert torch.equal(fast, slow), (grad_dtype, weight_dtype, length, mu)


@needs_native
def test_kernels_decline_what_they_do_not_take():
    """Non-contiguous tensors, unknown modes and long stochastic shifts go to the PyTorch code."""
    a = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    assert native.round_shift(a.t(), 1, "nearest", 127, torch.int8) is None
    assert native.round_shift(a, 1, "pseudo", 127, torch.int8) is None
    assert native.round_shift(a.to(torch.int64), 32, "stochastic", 127, torch.int8, (1, 2)) is None
    assert native.round_shift(a, 1, "nearest", 127, torch.int32) is None
    assert native.update_pseudo(torch.zeros(4, 3, dtype=torch.int8), a, 1, 127) is None
    assert native.max_abs(a.t()) is None


@needs_native
@pytest.mark.parametrize("dtype", (torch.int8, torch.int16))
def test_add_into_int64(dtype):
    limit = torch.iinfo(dtype).max
    values = torch.tensor([limit, -limit, 0, 1, -1, torch.iinfo(dtype).min], dtype=dtype).repeat(50)
    total = torch.full(values.shape, 2**40, dtype=torch.int64)
    expected = total + values.to(torch.int64)
    assert native.add_into_int64(total, values)
    assert torch.equal(total, expected)
    assert not native.add_into_int64(total.to(torch.int32), values)  # only int64 sums
    assert not native.add_into_int64(total[::2], values[::2])  # not contiguous


@needs_native
def test_an_integer_step_gives_the_kernels_integer_tensors_only(monkeypatch):
    """What the integer-only audit (``tests/test_integer_only.py``, kernels off) cannot see: in a
    LeNet-5 step with the reference kernels, int16 masters, stochastic error rounding and weight
    averaging, every tensor the C kernels receive is an integer tensor (their float inputs exist
    for the cpu backend's float path only)."""
    from intrain.methods.niti import Niti, NitiOptions
    from intrain.models import build_int_model
    from intrain.numeric.qtensor import QTensor

    seen = []
    for name in ("max_abs", "round_shift", "update_pseudo", "add_into_int64"):
        def spy(*args, real=getattr(native, name), **kwargs):
            seen.extend(a.dtype for a in args if isinstance(a, torch.Tensor))
            return real(*args, **kwargs)
        monkeypatch.setattr(native, name, spy)
    options = NitiOptions(mu_schedule="0:2", weight_bits=16, error_rounding="stochastic")
    model = build_int_model("lenet5", (1, 28, 28), 10, seed=0, backend="reference", fmt=options.fmt)
    generator = torch.Generator().manual_seed(0)
    x = QTensor.of(torch.randint(0, 128, (8, 1, 28, 28), generator=generator).to(torch.int8), -7)
    Niti(model, options, seed=0).train_step(x, torch.randint(0, 10, (8,), generator=generator), 0, 0)
    assert len(seen) > 20 and not any(dtype.is_floating_point for dtype in seen), seen


@needs_native
@pytest.mark.parametrize("dtype", (torch.int8, torch.int16))
def test_softmax_gradient(dtype):
    """The loss gradient (``methods.loss.cross_entropy_grad``) with the C kernel equals the PyTorch
    code's at every logit exponent from far below to far above the table's range (right shifts
    past 63 bits, left shifts capped at 32), for random logits, equal logits, and rows holding the
    type's extremes."""
    from intrain.methods.loss import cross_entropy_grad

    top = torch.iinfo(dtype).max
    generator = torch.Generator().manual_seed(0)
    random = torch.randint(-top, top + 1, (40, 10), generator=generator, dtype=torch.int64)
    extremes = torch.tensor([[top, -top] + [0] * 8, [-top - 1] * 10, [top] * 10, [-top - 1, top] + [-1] * 8])
    for values in (random, extremes):
        v = values.to(dtype)
        target = torch.randint(0, 10, (v.shape[0],), generator=generator)
        for e in list(range(-80, 20, 3)) + [-40, -8, -7, -6, 0, 60]:
            logits = QTensor(v, torch.tensor(e))
            fast = cross_entropy_grad(logits, target, seed=3, step=e + 100)
            slow = torch_only(cross_entropy_grad, logits, target, seed=3, step=e + 100)
            assert torch.equal(fast.v, slow.v) and int(fast.e) == int(slow.e), (dtype, e)
    with pytest.raises(IndexError, match="target class"):
        cross_entropy_grad(QTensor(v, torch.tensor(0)), torch.full((v.shape[0],), 10), seed=0, step=0)


@needs_native
@pytest.mark.parametrize("dtype", (torch.int8, torch.int16))
@pytest.mark.parametrize("kernel_size", (2, 3))
def test_max_pool(dtype, kernel_size):
    """Max pooling (``layers.pooling``) with the C kernels gives the PyTorch code's maxima, arg-max
    positions and routed errors: ties everywhere (values from a range of three), the type's
    minimum and maximum in every window position, sizes that leave rows and columns out of every
    window, evaluation mode (no arg-max kept), and errors of each type backward takes."""
    from intrain.layers import IntMaxPool2d

    low, high = torch.iinfo(dtype).min, torch.iinfo(dtype).max
    generator = torch.Generator().manual_seed(kernel_size)
    tied = torch.randint(-1, 2, (3, 4, 13, 11), generator=generator)
    extremes = torch.randint(0, 2, (2, 3, 12, 12), generator=generator) * (high - low) + low
    for values in (tied, extremes, torch.full((1, 2, 6, 6), low), torch.full((1, 2, 6, 6), high)):
        x = QTensor(values.to(dtype), torch.tensor(-3))
        for training in (True, False):
            fast, slow = IntMaxPool2d(kernel_size).train(training), IntMaxPool2d(kernel_size).train(training)
            y_fast, y_slow = fast(x), torch_only(slow, x)
            assert torch.equal(y_fast.v, y_slow.v) and y_fast.v.dtype == dtype
            if not training:
                continue
            assert torch.equal(fast._argmax, slow._argmax)
            for error_dtype in (torch.int8, torch.int16, torch.int32):
                top = torch.iinfo(error_dtype).max
                d = torch.randint(-top, top + 1, y_fast.v.shape, generator=generator, dtype=torch.int64)
                d = QTensor(d.to(error_dtype), torch.tensor(-5))
                argmax = fast._argmax
                routed_fast = fast.backward(d, None)
                slow._argmax = fast._argmax = argmax
                routed_slow = torch_only(slow.backward, d, None)
                assert torch.equal(routed_fast.v, routed_slow.v) and routed_fast.v.dtype == error_dtype
                fast._argmax = argmax
    assert native.max_pool(torch.zeros(2, 3, 4, 4, dtype=torch.int32), 2, True) is None  # not int8/int16
    assert native.max_pool(torch.zeros(2, 3, 4, 4, dtype=torch.int8).transpose(2, 3), 2, True) is None


@st.composite
def direct_conv_shapes(draw):
    """A stride-1 convolution the direct kernels take: at most 32 products per output."""
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    c = draw(st.integers(1, max(1, 32 // (kh * kw))))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    h = max(1, kh - 2 * ph + draw(st.integers(0, 9)))
    w = max(1, kw - 2 * pw + draw(st.integers(0, 9)))
    return draw(st.integers(1, 5)), c, draw(st.integers(1, 7)), h, w, (kh, kw), (ph, pw)


def _int8_operand(generator: torch.Generator, shape, mode: str) -> torch.Tensor:
    """int8 values: uniform over [-128, 127], or only the ends -128 and 127."""
    if mode == "uniform":
        return torch.randint(-128, 128, shape, generator=generator).to(torch.int8)
    return (torch.randint(0, 2, shape, generator=generator) * 255 - 128).to(torch.int8)


@needs_native
@settings(max_examples=60, deadline=None, derandomize=True)
@given(shape=direct_conv_shapes(), mode=st.sampled_from(["uniform", "ends"]), seed=st.integers(0, 2**31 - 1),
       layout=st.sampled_from(["contiguous", "channels last"]))
def test_direct_convolutions_match_reference(shape, mode, seed, layout):
    """The direct convolutions of few input channels (forward, weight gradient) are the
    reference's integers, for any kernel, padding and size they take, -128 included, and for
    operands in another memory layout."""
    from intrain.kernels import reference

    n, c, o, h, w, kernel_hw, padding = shape
    generator = torch.Generator().manual_seed(seed)
    x = _int8_operand(generator, (n, c, h, w), mode)
    weight = _int8_operand(generator, (o, c, *kernel_hw), mode)
    ho, wo = h + 2 * padding[0] - kernel_hw[0] + 1, w + 2 * padding[1] - kernel_hw[1] + 1
    d = _int8_operand(generator, (n, o, ho, wo), mode)
    if layout == "channels last":
        x, d = (t.contiguous(memory_format=torch.channels_last) for t in (x, d))
    assert native.direct_conv_applies(x, weight, kernel_hw, padding)
    forward = native.conv_direct_forward(x, weight, padding)
    assert forward.dtype == torch.int32
    assert torch.equal(forward, reference.conv2d_forward(x, weight, 1, padding))
    assert native.direct_conv_applies(x, d, kernel_hw, padding)
    grad = native.conv_direct_weight_grad(d, x, kernel_hw, padding)
    assert grad.dtype == torch.int64
    assert torch.equal(grad, reference.conv2d_backward_weight(d, x, kernel_hw, 1, padding).to(torch.int64))


@needs_native
def test_direct_weight_grad_at_its_longest_plane():
    """The worst case of the direct weight gradient's int32 sums: a plane of 131,071 output
    positions (the most it takes) with every operand -128, so one sample's sum for the middle tap
    is 131,071 * 2**14 = 2**31 - 2**14; the next size up and a 33rd product per output are
    refused (the backend then takes another path)."""
    from intrain.kernels import reference

    x = torch.full((2, 1, 1, native.DIRECT_MAX_POSITIONS), -128, dtype=torch.int8)
    d = torch.full((2, 1, 1, native.DIRECT_MAX_POSITIONS), -128, dtype=torch.int8)
    grad = native.conv_direct_weight_grad(d, x, (1, 3), (0, 1))
    assert grad[0, 0, 0, 1] == 2 * (2**31 - 2**14)
    assert torch.equal(grad, reference.conv2d_backward_weight(d, x, (1, 3), 1, (0, 1)).to(torch.int64))
    assert not native.direct_conv_applies(torch.zeros((1, 1, 1, native.DIRECT_MAX_POSITIONS + 1), dtype=torch.int8),
                                          d, (1, 1), (0, 0))
    assert not native.direct_conv_applies(torch.zeros((1, 33, 4, 4), dtype=torch.int8),
                                          torch.zeros((2, 33, 1, 1), dtype=torch.int8), (1, 1), (0, 0))
    assert not native.direct_conv_applies(x.to(torch.int16), d.to(torch.int16), (1, 3), (0, 1))


def _chunk_of_magnitude(generator: torch.Generator, scale: int, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Random values of magnitude at most ``scale``, with +-scale, 0, -1, and the ties of the
    shift that a product of this magnitude gets (and their neighbours)."""
    v = torch.randint(-scale, scale + 1, (3, 4, 5, 6), generator=generator, dtype=torch.int64)
    flat = v.view(-1)
    s = max(scale.bit_length() - (bits - 1), 1)
    half = 2 ** (s - 1)
    special = torch.tensor([scale, -scale, 0, -1, half, -half, 3 * half, -3 * half, half - 1, 1 - half])
    flat[:len(special)] = special.clamp(-scale, scale)
    return v.to(dtype)


@needs_native
@pytest.mark.parametrize("bits", (8, 16))
@pytest.mark.parametrize("layout", ("contiguous", "channels last"))
def test_requantize_chunks_keeps_and_rounds_integer_chunks_in_c(bits, layout):
    """``requantize_chunks`` keeps integer chunks (int32 for 8-bit results, int64 for 16-bit ones)
    and rounds them with the C kernels (``native.floor_shift``, ``native.round_kept``), giving the
    PyTorch code's values, memory layout and shift: chunks of very different magnitudes (each its
    own kept shift; the largest at the promised maximum 2**31 - 1 or 2**62 - 1), ties of the final
    shift and their neighbours, and products small enough for no shift at all."""
    from intrain.kernels.cpu.chunks import requantize_chunks

    dtype = torch.int32 if bits == 8 else torch.int64
    top = 2**31 - 1 if bits == 8 else 2**62 - 1
    generator = torch.Generator().manual_seed(bits)
    applied = []
    spies = {}
    for kernel in ("floor_shift", "round_kept"):
        real = getattr(native, kernel)
        spies[kernel] = lambda *a, _real=real, _name=kernel: applied.append((_name, _real(*a))) or applied[-1][1]
    for scales in ((top, 2**20, 5, 2**25), (100, 3), (2 ** (bits - 1) - 1, 1)):
        chunks = [_chunk_of_magnitude(generator, scale, bits, dtype) for scale in scales]
        if layout == "channels last":
            chunks = [c.contiguous(memory_format=torch.channels_last) for c in chunks]
        n = 3 * len(chunks)
        applied.clear()
        with mock.patch.multiple(native, **spies):
            fast = requantize_chunks(n, [(3 * i, c.clone()) for i, c in enumerate(chunks)], bits=bits)
        assert applied == [("floor_shift", True)] * len(chunks) + [("round_kept", True)] * len(chunks)
        slow = torch_only(requantize_chunks, n, [(3 * i, c.clone()) for i, c in enumerate(chunks)], bits=bits)
        assert torch.equal(fast[0], slow[0]) and fast[0].dtype == slow[0].dtype
        assert fast[0].stride() == slow[0].stride() and int(fast[1]) == int(slow[1])


@needs_native
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("samples,hw,n", [(3, 37, 35), (2, 16, 16), (1, 5, 40), (4, 1, 3)])
def test_combine_halves_into_nchw_through_tiles(samples, hw, n, accumulate):
    """``native.combine_halves`` into NCHW (hw > 1; hw = 1 is the row-major case) against the sum
    written out in PyTorch: positions and columns both more than one 16 x 16 tile and not a
    multiple of it, exactly one tile, one narrow tile; the parts at the ends of int32 inside a
    wider row stride (as the products [rows, 2O + 1] give them); written or added."""
    gen = torch.Generator().manual_seed(hw * n)
    m = samples * hw
    wide_rows = torch.randint(-2**31, 2**31, (m, 2 * n + 3), generator=gen, dtype=torch.int64).to(torch.int32)
    wide_rows[0], wide_rows[-1] = -2**31, 2**31 - 1
    parts = tuple(wide_rows[:, i:i + n] for i in (0, n, 1, n + 3 - n % 2))
    rows = torch.randint(-2**40, 2**40, (m, 1), generator=gen, dtype=torch.int64)
    cols = torch.randint(-2**40, 2**40, (1, n), generator=gen, dtype=torch.int64)
    hh, c1, c2, ll = (part.to(torch.int64) for part in parts)
    total = hh * 65536 + (c1 + c2) * 256 + ll + rows + cols  # [m, n], row r = (sample, position)
    expected = total.view(samples, hw, n).permute(0, 2, 1)
    out = torch.randint(-2**40, 2**40, (samples, n, hw), generator=gen, dtype=torch.int64)
    if accumulate:
        expected = expected + out
    assert native.combine_halves(parts, rows, cols, out, hw=hw, accumulate=accumulate)
    assert torch.equal(out, expected)


def _int16_worst(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """int16 values over the whole range, both ends (-32768 and 32767) and the values whose high
    half would be 128 without int16_gemm's offset (32640..32767) among them."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randint(-32768, 32768, shape, generator=gen, dtype=torch.int32).to(torch.int16)
    flat = v.view(-1)
    flat[0], flat[-1], flat[flat.numel() // 2] = -32768, 32767, 32640
    return v


@needs_native
@pytest.mark.parametrize("layout", ["contiguous", "channels-last view", "chunk of a larger batch"])
@pytest.mark.parametrize("shift", [0, 1, 7, 15, 16])
@pytest.mark.parametrize("padding", [(0, 0), (1, 1), (2, 1)])
def test_split_halves_padded_is_shift_split_and_pad(layout, shift, padding):
    """``native.split_halves_padded`` against int16_gemm's PyTorch steps (shift_operand,
    split_halves, channels-last padding with the halves of 0), for NCHW and channels-last
    inputs (the cpu backend's spread errors are a channels-last view) and a slice of samples; 19
    channels and 18 columns: whole 8 x 8 blocks and what they leave, both ways."""
    from intrain.kernels.int16_gemm import ZERO_HI, ZERO_LO, split_halves
    n, c, h, w = 3, 19, 4, 18
    x = _int16_worst((n + 2, h, w, c) if layout == "channels-last view" else (n + 2, c, h, w), shift + sum(padding))
    x = x.permute(0, 3, 1, 2) if layout == "channels-last view" else x
    x = x[1:1 + n] if layout == "chunk of a larger batch" else x[:n]
    hi, lo = (torch.full((n, h + 2 * padding[0], w + 2 * padding[1], c), 99, dtype=torch.int8) for _ in range(2))
    assert native.split_halves_padded(x, shift, padding, hi, lo)
    want_hi, want_lo = split_halves(shift_operand(x.contiguous(), shift))
    for got, want, fill in ((hi, want_hi, ZERO_HI), (lo, want_lo, ZERO_LO)):
        padded = torch.nn.functional.pad(want.permute(0, 2, 3, 1), (0, 0, padding[1], padding[1], padding[0],
                                                                    padding[0]), value=fill)
        assert torch.equal(got, padded)


@needs_native
@pytest.mark.parametrize("kernel_hw,stride", [((3, 3), (1, 1)), ((3, 3), (2, 2)), ((1, 1), (1, 1)),
                                              ((3, 2), (2, 1)), ((5, 5), (1, 1))])
def test_channels_last_columns_are_the_patches(kernel_hw, stride):
    """``native.channels_last_columns`` against the copy of ``int8_gemm.channels_last_patches``'
    strided view, with sizes that leave rows and columns no window reaches."""
    from intrain.kernels.int8_gemm import channels_last_patches
    gen = torch.Generator().manual_seed(sum(kernel_hw) + sum(stride))
    x = torch.randint(-128, 128, (3, 6, 10, 9), generator=gen, dtype=torch.int8)  # [N, C, H, W]
    padded = x.permute(0, 2, 3, 1).contiguous()  # padding 0: the patches of x itself
    want = channels_last_patches(x, *kernel_hw, stride, (0, 0))
    out = torch.full(want.shape, 99, dtype=torch.int8)
    assert native.channels_last_columns(padded, kernel_hw, stride, out)
    assert torch.equal(out, want)


@needs_native
@pytest.mark.parametrize("shift", [0, 1, 9, 16])
@pytest.mark.parametrize("block", ["all channels", "a block of channels"])
def test_error_halves_in_c_are_the_pytorch_ones(shift, block):
    """``int16_gemm._error_halves`` (a weight gradient's error rows) through
    ``native.split_error_rows`` against its PyTorch path: a slice of samples and of output
    channels of int16 errors over the whole range, -32768 included; the per-channel sums too."""
    from intrain.kernels import int16_gemm
    d = _int16_worst((5, 7, 3, 4), shift)[1:4]
    d = d[:, 2:6] if block == "a block of channels" else d
    width, rows = d.shape[1], d.shape[0] * 12
    buffers = [torch.full(((2 * width + 1) * rows + 5,), 99, dtype=torch.int8) for _ in range(2)]
    got, got_sums = int16_gemm._error_halves(d, shift, buffers[0])
    want, want_sums = torch_only(int16_gemm._error_halves, d, shift, buffers[1])
    assert torch.equal(got, want) and torch.equal(got_sums, want_sums)
    assert torch.equal(want[2 * width], torch.ones(rows, dtype=torch.int8))
    shifted = shift_operand(d.contiguous(), shift)
    assert torch.equal(want_sums, shifted.sum((0, 2, 3), dtype=torch.int64))
    assert torch.equal(want[:width].view(width, -1, 12)[:, 1],
                       int16_gemm.split_halves(shifted)[0][1].reshape(width, 12))


@needs_native
@pytest.mark.parametrize("shift", [0, 3, 16])
def test_halves_columns_in_c_are_the_pytorch_ones(shift):
    """``int16_gemm.HalvesColumns`` through the two C passes against its PyTorch path, chunk by
    chunk (the last one shorter), for a stride-2 padded convolution of int16 values over the
    whole range."""
    from intrain.kernels import int16_gemm
    x = _int16_worst((7, 3, 9, 8), shift)
    made = [int16_gemm.HalvesColumns(x, (3, 3), (2, 2), (1, 1), 3, shift) for _ in range(2)]
    for n0 in range(0, 7, 3):
        got = made[0].of(n0)
        want = torch_only(made[1].of, n0)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert got[0].shape == (min(3, 7 - n0) * 5 * 4, 27)
