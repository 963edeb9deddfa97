"""One-pass C kernels for the elementwise integer work of a training step on CPU tensors
(``native.c``), with the bits of the PyTorch code in ``numeric.rounding``, ``numeric.requant``,
``methods.update``, ``methods.averaging``, ``methods.loss``, ``layers.pooling``,
``layers.recurrent`` (one step of the integer LSTM, forward and back), ``kernels.int16_gemm``,
``numeric.wide`` and ``methods.adamw_fixed``; and direct convolutions of int8 operands with few
input channels (``conv_direct_forward``, ``conv_direct_weight_grad``), which the cpu backend
takes instead of float or GEMM products for first layers.

Why: on a small model a training step is mostly fixed cost per tensor operation. Nearest
requantisation of an int32 accumulator is five PyTorch passes (sign mask, add, shift, halve,
subtract) plus the clip and the narrowing copy, stochastic rounding about twenty (the counter
hash), NITI's pseudo-stochastic update about a dozen, adding int8 weights into int64 sums a
conversion and an add, the integer softmax gradient about twenty small operations, a 2x2 max
pool with its arg-max seven passes over strided views and its backward eight; each kernel here
is one pass over the data and one call (``python benchmarks/native_speed.py`` times whole
steps both ways). The PyTorch code stays the reference and the path on every other device;
``tests/test_native.py`` checks every kernel against it bit for bit, on random values and on the
extremes of each type.

Each function returns ``None`` where its kernel does not apply (no compiled library, a tensor
not on the CPU or not contiguous, a dtype or shift it does not take): the caller then runs the
PyTorch code. Integer ranges are the callers' (listed at the top of ``native.c``).

Threads: a call over at least ``PARALLEL_MIN`` elements is cut into ``torch.get_num_threads()``
contiguous ranges (whole rows, planes or samples where the kernel works on those) run at once by
the kernel itself on the OpenMP team of PyTorch's own operations: the library is compiled with
``-fopenmp`` but linked to no OpenMP runtime, so its parallel regions resolve to the one PyTorch
loaded (``openmp()`` says whether that worked; elsewhere the ranges run one after another). A
pool of Python threads did this before; in a training step its threads competed for the cores with
OpenMP's, which spin for a while after each PyTorch operation, and the cut made LeNet-5's direct
convolutions slower instead of faster (BENCHMARKS.md). Every element is computed by the same code
whatever the cut (stochastic rounding draws by element position), so the bits do not depend on the
thread count.

Building: the first call compiles ``native.c`` with the system's C compiler (``$CC``, else ``cc``
or ``gcc``; about a second) at ``-O3 -march=native`` (and ``-fopenmp`` where the compiler takes it
and the result loads) into ``$INTRAIN_CACHE_DIR`` (default
``~/.cache/intrain``), keyed by the source, the compiler's version and this CPU's identity, so a
shared cache never hands one CPU another's instructions; the file is written beside its final
name and renamed, so processes starting together (torchrun) never load half a file. Without a
compiler, or with ``INTRAIN_NATIVE=off`` in the environment, every rounding runs in PyTorch: the
same bits, more time.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native.c")

_TYPE_NAMES = {torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
               torch.float32: "f32", torch.float64: "f64"}
_INTEGER_INPUTS = ("i16", "i32", "i64")
_OUTPUTS = ("i8", "i16")
_POOLED_ERRORS = ("i8", "i16", "i32")
#: Stochastic noise is the top bits of one 32-bit draw (``rng.uniform_bits`` for bits <= 31).
MAX_STOCHASTIC_SHIFT = 31


def cache_dir() -> Path:
    """Where intrain keeps what it measures or builds once per machine."""
    return Path(os.environ.get("INTRAIN_CACHE_DIR") or Path.home().joinpath(".cache", "intrain"))


def cpu_identity() -> str:
    """The CPU's model name and a digest of its feature flags (Linux), else what platform knows."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = hashlib.sha256(fields.get("flags", "").encode()).hexdigest()[:16]
    return f"{model}|{flags}"


BASE_FLAGS = ("-O3", "-march=native", "-std=gnu11", "-fPIC")
#: Vectors as wide as the CPU has: gcc and clang otherwise keep to 256 bits on AVX-512 CPUs. The
#: kernels then run 1.3-2x faster on the Xeon of BENCHMARKS.md (``python
#: benchmarks/native_flags.py``); on CPUs without 512-bit vectors the flag changes nothing, and a
#: compiler that does not know it builds with the base flags.
WIDE_VECTORS = "-mprefer-vector-width=512"
#: OpenMP's pragmas (``IN_RANGES`` in native.c); the object is linked without an OpenMP library.
OPENMP = "-fopenmp"
#: What ``library()`` tries, in order: the first that builds and loads is used.
FLAG_SETS = ((*BASE_FLAGS, WIDE_VECTORS, OPENMP), (*BASE_FLAGS, OPENMP), (*BASE_FLAGS, WIDE_VECTORS), BASE_FLAGS)


def build(compiler: str, flags: tuple[str, ...] = FLAG_SETS[0]) -> Path | None:
    """Compile native.c with ``flags`` into an object, then link it alone into a shared library
    (no ``-fopenmp`` at that step: no OpenMP runtime of its own, see the module's text); cached by
    source, compiler, CPU and flags; ``None`` when that fails."""
    source = SOURCE.read_bytes()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key = hashlib.sha256(b"|".join([source, version.encode(), cpu_identity().encode(),
                                    " ".join(flags).encode(), platform.machine().encode()]))
    path = cache_dir().joinpath(f"native-{key.hexdigest()[:20]}.so")
    if path.exists():
        return path
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    obj = path.with_name(f"{path.name}.{os.getpid()}.o")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for command in ([compiler, *flags, "-c", "-o", str(obj), str(SOURCE)],
                        [compiler, "-shared", "-o", str(temporary), str(obj)]):
            if subprocess.run(command, capture_output=True, timeout=300).returncode != 0:
                return None
        os.replace(temporary, path)
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        temporary.unlink(missing_ok=True)
        obj.unlink(missing_ok=True)
    return path


def _declare(lib: ctypes.CDLL) -> None:
    """Every kernel's signature; the last int of those that cut their work is the thread count."""
    p, n, i, u32, u64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64
    lib.intrain_team_size.argtypes, lib.intrain_team_size.restype = [i], i
    lib.intrain_openmp_entry.argtypes, lib.intrain_openmp_entry.restype = [], p
    for t in _TYPE_NAMES.values():
        fn = getattr(lib, f"intrain_max_abs_{t}")
        fn.argtypes, fn.restype = [p, n, i], n
    for out in _OUTPUTS:
        for t in _INTEGER_INPUTS + ("f32", "f64"):
            getattr(lib, f"intrain_round_nearest_{t}_{out}").argtypes = [p, p, n, i, n, i]
        for t in _INTEGER_INPUTS:
            getattr(lib, f"intrain_round_stochastic_{t}_{out}").argtypes = [p, p, n, i, n, u32, u32, u64, i]
    lib.intrain_round_nearest_i64_i32.argtypes = [p, p, n, i, n, i]
    lib.intrain_round_nearest_i16w_i16.argtypes = [p, p, n, i, n, i]
    for g in ("i32", "i64"):
        for w in _OUTPUTS:
            getattr(lib, f"intrain_update_pseudo_{g}_{w}").argtypes = [p, p, p, n, i, n, i]
    for w in _OUTPUTS:
        getattr(lib, f"intrain_add_into_i64_{w}").argtypes = [p, p, n, i]
        fn = getattr(lib, f"intrain_softmax_grad_{w}")
        fn.argtypes, fn.restype = [p, p, p, p, n, n, n, n, i, i], i
        getattr(lib, f"intrain_max_pool_{w}").argtypes = [p, p, p, n, n, n, i, i]
    for d in _POOLED_ERRORS:
        getattr(lib, f"intrain_max_pool_backward_{d}").argtypes = [p, p, p, n, n, n, i, i]
    lib.intrain_combine_halves.argtypes = [p, p, p, p, n, p, p, p, n, n, n, i, i]
    lib.intrain_split_halves_padded.argtypes = [p] + [n] * 10 + [i, p, p, i]
    lib.intrain_channels_last_columns.argtypes = [p] + [n] * 10 + [p, i]
    lib.intrain_split_error_rows.argtypes = [p, n, n, n, n, n, i, p, p, p, i]
    lib.intrain_wide_add_max.argtypes, lib.intrain_wide_add_max.restype = [p, i, p, i, n, i], n
    lib.intrain_wide_add_round.argtypes = [p, i, p, i, i, p, n, i]
    lib.intrain_wide_scale_round.argtypes = [p, n, i, p, n, i]
    lib.intrain_adamw_quotient.argtypes = [p, p, n, i, n, p, n, i]
    lib.intrain_adamw_second_moment.argtypes = [p, p, n, n, i, i, p, n, i]
    lib.intrain_adamw_second_moment.restype = n
    for rec in ("i32", "i64"):
        getattr(lib, f"intrain_lstm_step_forward_{rec}").argtypes = [p, n, p, i, n, p, p, p, p, p, p, p, n, n, i]
    lib.intrain_lstm_step_backward.argtypes = [p, n, p, n, p, p, p, p, n, p, p, n, n, p, p, p]
    lib.intrain_lstm_step_backward.restype = i
    for pair in ("i32_i16", "i64_i32"):
        getattr(lib, f"intrain_floor_shift_{pair}").argtypes = [p, p, n, i, i]
    for pair in ("i16_i8", "i32_i16"):
        getattr(lib, f"intrain_round_kept_{pair}").argtypes = [p, p, n, i, n, i]
    for name in ("intrain_conv_direct_forward", "intrain_conv_direct_weight_grad"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = [p, p, p] + [n] * 9 + [i], i


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or ``None`` (no compiler, a failed build, ``INTRAIN_NATIVE=off``)."""
    if os.environ.get("INTRAIN_NATIVE", "on").lower() == "off":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return None
    for flags in FLAG_SETS:  # an OpenMP build that does not load (no runtime to bind to) falls through
        path = build(compiler, flags)
        lib = load(path) if path is not None else None
        if lib is not None:
            return lib
    return None


def load(path: Path) -> ctypes.CDLL | None:
    """The compiled kernels at ``path`` with their signatures declared (``None`` if unloadable)."""
    try:
        lib = ctypes.CDLL(str(path))
        _declare(lib)
    except (OSError, AttributeError):
        return None
    return lib


def available() -> bool:
    """Whether the C kernels are in use on this machine."""
    return library() is not None


def openmp() -> bool:
    """Whether the C kernels cut their work on PyTorch's OpenMP team (else they run on the calling
    thread alone)."""
    lib = library()
    return lib is not None and lib.intrain_openmp_entry() is not None


#: Elements below which a kernel runs on the calling thread alone. ``OMP_NUM_THREADS=2 python
#: benchmarks/native_threads.py --sizes 8192,16384,32768 --calls 100`` (the Zen 4 of BENCHMARKS.md):
#: cut in two, every kernel took 0.62-0.84x of its one-thread time at 2**15 elements, 0.78-1.05x at
#: 2**14 and up to 1.49x at 2**13. (Python threads needed 2**20: handing them ranges cost 80-100 us.)
PARALLEL_MIN = 1 << 15


def _threads(elements: int) -> int:
    """The thread count for a call over ``elements``: PyTorch's from ``PARALLEL_MIN`` on, else 1."""
    return max(1, torch.get_num_threads()) if elements >= PARALLEL_MIN else 1


def _applies(*tensors: torch.Tensor) -> bool:
    # A loop, not all() over a generator: this runs several times per layer and step.
    for t in tensors:
        if not (t.is_cpu and t.is_contiguous() and t.dtype in _TYPE_NAMES):
            return False
    return True


def max_abs(a: torch.Tensor) -> int | None:
    """``max |a|`` as a Python int (0 for an empty tensor), or ``None`` where the kernel does not
    apply."""
    lib = library()
    if lib is None or not _applies(a):
        return None
    kernel = getattr(lib, f"intrain_max_abs_{_TYPE_NAMES[a.dtype]}")
    return kernel(a.data_ptr(), a.numel(), _threads(a.numel()))


def round_shift(a: torch.Tensor, shift: int, mode: str, limit: int, out_dtype: torch.dtype,
                key: tuple[int, int] | None = None, offset: int = 0) -> torch.Tensor | None:
    """``shift_round(a, shift, mode, key, offset).clamp(-limit, limit).to(out_dtype)`` for mode
    "nearest" or "stochastic", in one pass; ``None`` where the kernel does not apply."""
    lib = library()
    name, out = _TYPE_NAMES.get(a.dtype), _TYPE_NAMES.get(out_dtype)
    if lib is None or not _applies(a) or (out not in _OUTPUTS and (name, out, mode) != ("i64", "i32", "nearest")):
        return None
    values = torch.empty(a.shape, dtype=out_dtype)
    src, dst = a.data_ptr(), values.data_ptr()
    if mode == "nearest":
        kernel = getattr(lib, f"intrain_round_nearest_{name}_{out}")
        kernel(src, dst, a.numel(), shift, limit, _threads(a.numel()))
        return values
    if mode != "stochastic" or name not in _INTEGER_INPUTS or shift > MAX_STOCHASTIC_SHIFT:
        return None
    if key is None:
        raise ValueError("stochastic rounding needs a random key")
    if offset < 0 or offset + a.numel() > 2**32:
        raise ValueError("uint32 supports element positions in [0, 2**32): a smaller tensor or offset")
    kernel = getattr(lib, f"intrain_round_stochastic_{name}_{out}")
    kernel(src, dst, a.numel(), shift, limit, key[0], key[1], offset, _threads(a.numel()))
    return values


def shift_int16(v: torch.Tensor, shift: int) -> torch.Tensor | None:
    """``shift_round(v, shift, "nearest")`` of an int16 ``v`` (any value, -32768 included) in
    int16, in one pass; ``None`` where the kernel does not apply."""
    lib = library()
    if lib is None or v.dtype != torch.int16 or not _applies(v) or not 0 <= shift < 32:
        return None
    values = torch.empty(v.shape, dtype=torch.int16)
    src, dst = v.data_ptr(), values.data_ptr()
    lib.intrain_round_nearest_i16w_i16(src, dst, v.numel(), shift, 32767, _threads(v.numel()))
    return values


def update_pseudo(weight: torch.Tensor, grad: torch.Tensor, shift: int, limit: int) -> torch.Tensor | None:
    """``clamp(weight - shift_round(grad, shift, "pseudo"), -limit, limit)`` in the weight's
    dtype, in one pass; ``None`` where the kernel does not apply."""
    lib = library()
    g, w = _TYPE_NAMES.get(grad.dtype), _TYPE_NAMES.get(weight.dtype)
    if (lib is None or not _applies(weight, grad) or g not in ("i32", "i64") or w not in _OUTPUTS
            or weight.shape != grad.shape):
        return None
    updated = torch.empty_like(weight)
    kernel = getattr(lib, f"intrain_update_pseudo_{g}_{w}")
    kernel(weight.data_ptr(), grad.data_ptr(), updated.data_ptr(), grad.numel(), shift, limit, _threads(grad.numel()))
    return updated


def add_into_int64(total: torch.Tensor, values: torch.Tensor) -> bool:
    """``total += values`` for an int64 ``total`` and int8 or int16 ``values`` of its shape, in
    one pass; False (nothing done) where the kernel does not apply."""
    lib = library()
    name = _TYPE_NAMES.get(values.dtype)
    if (lib is None or total.dtype != torch.int64 or name not in _OUTPUTS or not _applies(total, values)
            or total.shape != values.shape):
        return False
    kernel = getattr(lib, f"intrain_add_into_i64_{name}")
    kernel(total.data_ptr(), values.data_ptr(), values.numel(), _threads(values.numel()))
    return True


def softmax_gradient(logits: torch.Tensor, e: int, target: torch.Tensor, table: torch.Tensor,
                     log2e_q15: int, fraction_bits: int, prob_bits: int) -> torch.Tensor | None:
    """``methods.loss``'s integer ``softmax(z) - onehot(target)`` scaled by ``2**prob_bits`` (int64
    [N, K]) from int8 or int16 logits [N, K] with exponent ``e``, in one pass per row; ``None``
    where the kernel does not apply."""
    lib = library()
    name = _TYPE_NAMES.get(logits.dtype)
    if (lib is None or name not in _OUTPUTS or logits.dim() != 2 or target.dtype != torch.int64
            or table.dtype != torch.int64 or not _applies(logits, target, table)
            or target.shape != logits.shape[:1]):
        return None
    rows, cols = logits.shape
    g = torch.empty((rows, cols), dtype=torch.int64)
    status = getattr(lib, f"intrain_softmax_grad_{name}")(
        logits.data_ptr(), target.data_ptr(), table.data_ptr(), g.data_ptr(), rows, cols,
        15 - fraction_bits - e, log2e_q15, fraction_bits, prob_bits)
    if status != 0:
        raise IndexError(f"a target class is outside [0, {cols}): labels must index the logits")
    return g


def max_pool(x: torch.Tensor, k: int, training: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Maxima of the k x k windows (stride k) of int8 or int16 x [N, C, H, W], and in training
    the window position (int8, 0 .. k*k-1, row-major) of each window's first maximum; ``None``
    where the kernel does not apply."""
    lib = library()
    name = _TYPE_NAMES.get(x.dtype)
    if lib is None or name not in _OUTPUTS or x.dim() != 4 or not _applies(x) or not 1 <= k * k <= 127:
        return None
    n, c, h, w = x.shape
    maxima = torch.empty((n, c, h // k, w // k), dtype=x.dtype)
    argmax = torch.empty(maxima.shape, dtype=torch.int8) if training else None
    getattr(lib, f"intrain_max_pool_{name}")(x.data_ptr(), maxima.data_ptr(), argmax.data_ptr() if training else None,
                                             n * c, h, w, k, _threads(x.numel()))
    return maxima, argmax


def max_pool_backward(d: torch.Tensor, argmax: torch.Tensor, input_hw: tuple[int, int], k: int
                      ) -> torch.Tensor | None:
    """The error d [N, C, H/k, W/k] (int8, int16 or int32) at each window's arg-max of a zero
    [N, C, H, W]; ``None`` where the kernel does not apply."""
    lib = library()
    name = _TYPE_NAMES.get(d.dtype)
    if (lib is None or name not in _POOLED_ERRORS or argmax.dtype != torch.int8 or not _applies(d, argmax)
            or d.shape != argmax.shape or d.dim() != 4):
        return None
    n, c = d.shape[:2]
    routed = torch.empty((n, c, *input_hw), dtype=d.dtype)
    getattr(lib, f"intrain_max_pool_backward_{name}")(d.data_ptr(), argmax.data_ptr(), routed.data_ptr(), n * c,
                                                      *input_hw, k, _threads(routed.numel()))
    return routed


def combine_halves(parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], rows: torch.Tensor,
                   cols: torch.Tensor, out: torch.Tensor, hw: int = 1, accumulate: bool = False) -> bool:
    """``kernels.int16_gemm``'s combination of an int16 product from the products of its halves
    ``parts = (hh, c1, c2, ll)``, int32 [M, N] views with one row stride and unit column stride:
    ``out (+)= 65536 hh + 256 (c1 + c2) + ll + rows + cols`` (``rows`` int64 [M, 1], ``cols`` int64
    [1, N]) into a contiguous int64 ``out``, [M, N] for ``hw = 1``, else [M / hw, N, hw] with row
    ``r`` at sample ``r // hw`` and position ``r % hw``, in one pass; False (nothing done) where the
    kernel does not apply."""
    lib = library()
    if lib is None or not (out.is_cpu and out.dtype == torch.int64 and out.is_contiguous()):
        return False
    m, n = parts[0].shape
    ld = parts[0].stride(0)
    for part in parts:
        if (not part.is_cpu or part.dtype != torch.int32 or part.shape != (m, n)
                or (n > 1 and part.stride(1) != 1) or (m > 1 and part.stride(0) != ld)):
            return False
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    if (rows.dtype != torch.int64 or cols.dtype != torch.int64 or not _applies(rows, cols)
            or rows.numel() != m or cols.numel() != n or out.numel() != m * n or hw < 1 or m % hw):
        return False
    lib.intrain_combine_halves(*(part.data_ptr() for part in parts), ld, rows.data_ptr(), cols.data_ptr(),
                               out.data_ptr(), m, n, hw, int(accumulate), _threads(m * n))
    return True


def split_halves_padded(x: torch.Tensor, shift: int, padding: tuple[int, int], hi: torch.Tensor,
                        lo: torch.Tensor) -> bool:
    """``kernels.int16_gemm``'s int8 halves of an int16 chunk ``x`` [n, C, H, W] (any strides)
    shifted right by ``shift`` with nearest rounding, written channels last into the contiguous
    int8 ``hi`` and ``lo`` [n, H + 2ph, W + 2pw, C] with the padding filled by the halves of 0, in
    one pass; False (nothing done) where the kernel does not apply."""
    lib = library()
    if lib is None or not (x.is_cpu and x.dtype == torch.int16 and x.dim() == 4 and 0 <= shift < 32):
        return False
    n, c, h, w = x.shape
    shape = (n, h + 2 * padding[0], w + 2 * padding[1], c)
    for half in (hi, lo):
        if not (half.is_cpu and half.dtype == torch.int8 and half.is_contiguous() and half.shape == shape):
            return False
    lib.intrain_split_halves_padded(x.data_ptr(), *x.stride(), n, c, h, w, *padding, shift, hi.data_ptr(), lo.data_ptr(),
                                    _threads(n * c * h * w))
    return True


def split_error_rows(d: torch.Tensor, shift: int, out: torch.Tensor, sums: torch.Tensor) -> bool:
    """``kernels.int16_gemm``'s rows of the halves of a weight gradient's errors, d [n, B, Ho, Wo]
    int16 (positions contiguous) shifted right by ``shift`` with nearest rounding: into the
    contiguous int8 ``out`` [2B, n Ho Wo], row o the high halves of channel o and row B + o its low
    halves in (sample, position) order, with each channel's sum of shifted values added into the
    int64 ``sums`` [B], in one pass; False (nothing done) where the kernel does not apply."""
    lib = library()
    if lib is None or not (d.is_cpu and d.dtype == torch.int16 and d.dim() == 4 and 0 <= shift < 32):
        return False
    n, width, ho, wo = d.shape
    hw = ho * wo
    if not ((d.stride(3) == 1 or wo == 1) and (d.stride(2) == wo or ho == 1) and hw < 2**16):
        return False  # positions not contiguous, or more of them than an int32 sum of 2**15s takes
    if not (out.is_cpu and out.dtype == torch.int8 and out.is_contiguous() and out.shape == (2 * width, n * hw)
            and sums.is_cpu and sums.dtype == torch.int64 and sums.is_contiguous() and sums.numel() == width):
        return False
    hp = out.data_ptr()
    lib.intrain_split_error_rows(d.data_ptr(), *d.stride()[:2], n, width, hw, shift, hp, hp + width * n * hw,
                                 sums.data_ptr(), _threads(width * n * hw))
    return True


def channels_last_columns(padded: torch.Tensor, kernel_hw: tuple[int, int], stride: tuple[int, int],
                          out: torch.Tensor) -> bool:
    """The im2col columns of a contiguous padded channels-last int8 tensor [n, H', W', C] into the
    contiguous int8 ``out`` [n, Ho, Wo, kh, kw, C] (rows of (kh, kw, C) runs, as
    ``kernels.int8_gemm.channels_last_patches`` orders them), in one pass; False (nothing done)
    where the kernel does not apply."""
    lib = library()
    if lib is None or not (padded.is_cpu and padded.dtype == torch.int8 and padded.is_contiguous()
                           and padded.dim() == 4):
        return False
    n, hp, wp, c = padded.shape
    (kh, kw), (sh, sw) = kernel_hw, stride
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    if not (out.is_cpu and out.dtype == torch.int8 and out.is_contiguous() and out.shape == (n, ho, wo, kh, kw, c)
            and ho > 0 and wo > 0):
        return False
    lib.intrain_channels_last_columns(padded.data_ptr(), n, hp, wp, c, kh, kw, sh, sw, ho, wo, out.data_ptr(),
                                      _threads(out.numel()))
    return True


def _same_dense_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Both CPU tensors of one shape and strides, dense in row-major or channels-last order."""
    if not (a.is_cpu and b.is_cpu and a.shape == b.shape and a.stride() == b.stride()):
        return False
    return a.is_contiguous() or (a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last))


#: (input dtype, output dtype) -> suffix of the chunk kernels (``floor_shift``, ``round_kept``).
_NARROWING = {(torch.int32, torch.int16): "i32_i16", (torch.int64, torch.int32): "i64_i32",
              (torch.int16, torch.int8): "i16_i8"}


def _narrowing_pass(kernel: str, src: torch.Tensor, out: torch.Tensor, *scalars) -> bool:
    """Run ``intrain_<kernel>_<pair>(src, out, n, *scalars)`` over ``src`` into ``out`` (one
    dense layout), cut into ranges on threads; False (nothing done) where there is no such kernel
    for the dtypes or the layouts differ."""
    lib = library()
    name = f"intrain_{kernel}_{_NARROWING.get((src.dtype, out.dtype))}"
    if lib is None or not hasattr(lib, name) or not _same_dense_layout(src, out):
        return False
    getattr(lib, name)(src.data_ptr(), out.data_ptr(), src.numel(), *scalars, _threads(src.numel()))
    return True


def floor_shift(part: torch.Tensor, k: int, out: torch.Tensor) -> bool:
    """``kernels.cpu.chunks``' keeping of an integer chunk, ``out = floor(b / 2**k)`` (b: y - 1
    where y < 0), int32 -> int16 or int64 -> int32, in one pass; False (nothing done) where the
    kernel does not apply (it needs ``part`` and ``out`` in one dense memory layout)."""
    return 0 <= k < part.element_size() * 8 and _narrowing_pass("floor_shift", part, out, k)


def round_kept(kept: torch.Tensor, m: int, limit: int, out: torch.Tensor) -> bool:
    """``kernels.cpu.chunks``' rounding of a kept chunk by ``m`` more bits, clipped to +-``limit``,
    int16 -> int8 or int32 -> int16, in one pass; False (nothing done) where the kernel does not
    apply (it needs ``kept`` and ``out`` in one dense memory layout)."""
    return 0 <= m < 64 and _narrowing_pass("round_kept", kept, out, m, limit)


#: Magnitude bits of a wide value (``numeric.wide.VALUE_BITS``).
_WIDE_BITS = 31


def wide_add(a: torch.Tensor, a_shift: int, b: torch.Tensor, b_shift: int) -> tuple[torch.Tensor, int] | None:
    """``numeric.wide.add``'s values and extra shift for int32 ``a`` and ``b`` of one shape: each
    aligned by its shift (left for >= 0, at most 30 bits; else nearest right by at most 62), summed
    in int64 and rounded once to 31 bits, in two passes (the maximum, then the rounding) with no
    int64 temporaries; ``None`` where the kernels do not apply."""
    lib = library()
    if (lib is None or a.dtype != torch.int32 or b.dtype != torch.int32 or a.shape != b.shape
            or not _applies(a, b) or not (a_shift <= 30 and b_shift <= 30)):
        return None
    ap, bp = a.data_ptr(), b.data_ptr()
    largest = lib.intrain_wide_add_max(ap, a_shift, bp, b_shift, a.numel(), _threads(a.numel()))
    shift = max(largest.bit_length() - _WIDE_BITS, 0)
    values = torch.empty(a.shape, dtype=torch.int32)
    lib.intrain_wide_add_round(ap, a_shift, bp, b_shift, shift, values.data_ptr(), a.numel(), _threads(a.numel()))
    return values, shift


def wide_scale(v: torch.Tensor, factor: int) -> tuple[torch.Tensor, int] | None:
    """``numeric.wide.scale``'s values and shift for int32 ``v`` and ``|factor| < 2**31``: ``v *
    factor`` rounded once to 31 bits, the shift from ``max |v| * |factor|`` (which is ``max |v *
    factor|``), in one pass after the maximum; ``None`` where the kernels do not apply."""
    lib = library()
    largest = max_abs(v) if v.dtype == torch.int32 else None
    if lib is None or largest is None:
        return None
    shift = max((largest * abs(factor)).bit_length() - _WIDE_BITS, 0)
    values = torch.empty(v.shape, dtype=torch.int32)
    src, dst = v.data_ptr(), values.data_ptr()
    lib.intrain_wide_scale_round(src, factor, shift, dst, v.numel(), _threads(v.numel()))
    return values, shift


def adamw_second_moment(second: torch.Tensor, grad: torch.Tensor, keep: int, take: int, shift_kept: int,
                        shift_taken: int) -> tuple[torch.Tensor, int] | None:
    """``methods.adamw_fixed.second_moment_sum`` in one pass, with its largest value (int64 second
    moments ``<= 2**62``, int32 gradients of one shape, factors in ``[0, 2**31)``, shifts ``>= 0``);
    ``None`` where the kernels do not apply."""
    lib = library()
    if (lib is None or second.dtype != torch.int64 or grad.dtype != torch.int32 or second.shape != grad.shape
            or not _applies(second, grad)):
        return None
    out = torch.empty(second.shape, dtype=torch.int64)
    largest = lib.intrain_adamw_second_moment(second.data_ptr(), grad.data_ptr(), keep, take, min(shift_kept, 63),
                                              min(shift_taken, 63), out.data_ptr(), second.numel(),
                                              _threads(second.numel()))
    return out, largest


def adamw_quotient(second: torch.Tensor, first: torch.Tensor, root: int, shift: int, eps: int
                   ) -> torch.Tensor | None:
    """``methods.adamw_fixed.quotient`` in one pass (int64 second moments, int32 first moments of
    one shape, ``0 <= shift < 63``, ``0 < root < 2**31``, ``0 <= eps < 2**32``); ``None`` where the
    kernels do not apply."""
    lib = library()
    if (lib is None or second.dtype != torch.int64 or first.dtype != torch.int32 or second.shape != first.shape
            or not _applies(second, first) or not 0 <= shift < 63):
        return None
    out = torch.empty(second.shape, dtype=torch.int64)
    lib.intrain_adamw_quotient(second.data_ptr(), first.data_ptr(), root, shift, eps, out.data_ptr(), second.numel(),
                               _threads(second.numel()))
    return out


def lstm_step_forward(u: torch.Tensor, rec: torch.Tensor, rec_shift: int, forget_offset: int, c: torch.Tensor,
                      sigmoid: torch.Tensor, tanh: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """One step of ``layers.recurrent.IntLSTM.forward`` after the recurrent product, in one pass:
    ``u`` the step's input-map pre-activations in Q11 (int64 ``[N, 4H]``, rows of any stride),
    ``rec`` the recurrent product (int32 or int64 ``[N, 4H]``) to be brought to Q11 by ``to_fixed``
    with ``rec_shift`` (its exponent minus Q11's), ``forget_offset`` the forget gate's Q11 offset,
    ``c`` the cell state (int64 ``[N, H]``), the int16 sigmoid and tanh tables. Returns the gate
    values (int16 ``[N, 4H]``: i, f, g, o), ``tanh(c')`` (int16), ``c'`` (int64) and ``h'`` (int8),
    or ``None`` where the kernel does not apply."""
    lib = library()
    if (lib is None or u.dtype != torch.int64 or rec.dtype not in (torch.int32, torch.int64)
            or c.dtype != torch.int64 or u.dim() != 2 or u.stride(1) != 1 or not u.is_cpu
            or not _applies(rec, c, sigmoid, tanh) or rec.shape != u.shape
            or c.shape != (u.shape[0], u.shape[1] // 4) or u.shape[1] % 4
            or sigmoid.dtype != torch.int16 or tanh.dtype != torch.int16
            or sigmoid.numel() != 65535 or tanh.numel() != 65535):
        return None
    rows, hidden = c.shape
    gates = torch.empty(u.shape, dtype=torch.int16)
    tanh_c = torch.empty(c.shape, dtype=torch.int16)
    c_next = torch.empty(c.shape, dtype=torch.int64)
    h_next = torch.empty(c.shape, dtype=torch.int8)
    kernel = getattr(lib, f"intrain_lstm_step_forward_{_TYPE_NAMES[rec.dtype]}")
    kernel(u.data_ptr(), u.stride(0), rec.data_ptr(), max(-64, min(64, rec_shift)), forget_offset, c.data_ptr(),
           sigmoid.data_ptr(), tanh.data_ptr(), gates.data_ptr(), tanh_c.data_ptr(), c_next.data_ptr(),
           h_next.data_ptr(), rows, hidden, _threads(rows * hidden * 4))
    return gates, tanh_c, c_next, h_next


def lstm_step_backward(dh: torch.Tensor, dh_e: int, dc: torch.Tensor, dc_e: int, gates: tuple[torch.Tensor, ...],
                       tanh_c: torch.Tensor, c_prev: torch.Tensor
                       ) -> tuple[torch.Tensor, int, torch.Tensor, int] | None:
    """One step back through ``layers.recurrent.IntLSTM.backward`` before the recurrent product, in
    one call: from the errors ``dh`` and ``dc`` (int16 ``[N, H]``, exponents ``dh_e``, ``dc_e``) and
    the step's stored int16 gate values ``(i, f, g, o)`` (``[N, H]`` each, rows of one stride:
    views of ``[N, 4H]`` gates or tensors of their own), ``tanh(c)`` and ``c_prev``, the gate
    errors (int8 ``[N, 4H]``) with their exponent and ``dc_prev`` (int16) with its; ``None`` where
    the kernel does not apply."""
    lib = library()
    if lib is None or len(gates) != 4:
        return None
    shape = dh.shape
    if (dh.dim() != 2 or dc.shape != shape or tanh_c.shape != shape or c_prev.shape != shape
            or any(t.dtype != torch.int16 for t in (dh, dc, tanh_c, c_prev, *gates))
            or not _applies(dh, dc, tanh_c, c_prev)):
        return None
    row = gates[0].stride(0)
    if any(gate.shape != shape or not gate.is_cpu or gate.stride(1) != 1 or gate.stride(0) != row for gate in gates):
        return None
    rows, hidden = shape
    dz = torch.empty((rows, 4 * hidden), dtype=torch.int8)
    dc_prev = torch.empty(shape, dtype=torch.int16)
    exps = torch.empty(2, dtype=torch.int64)
    failed = lib.intrain_lstm_step_backward(dh.data_ptr(), dh_e, dc.data_ptr(), dc_e,
                                            *(gate.data_ptr() for gate in gates), row, tanh_c.data_ptr(),
                                            c_prev.data_ptr(), rows, hidden, dz.data_ptr(), dc_prev.data_ptr(),
                                            exps.data_ptr())
    if failed:
        raise MemoryError("out of memory in the LSTM's backward step")
    return dz, int(exps[0]), dc_prev, int(exps[1])


#: Most products per output a direct convolution takes (C * kh * kw; ``native.c``'s ranges).
DIRECT_MAX_COLUMNS = 32
#: Most output positions per plane (Ho * Wo) of a direct convolution: a sample's sum for one
#: weight gradient entry then stays below 2**31 (``native.c``).
DIRECT_MAX_POSITIONS = 131071


def _direct_output_hw(x: torch.Tensor, kernel_hw: tuple[int, int], padding: tuple[int, int]) -> tuple[int, int]:
    """(Ho, Wo) of a stride-1 convolution of x [N, C, H, W]."""
    return (x.shape[2] + 2 * padding[0] - kernel_hw[0] + 1, x.shape[3] + 2 * padding[1] - kernel_hw[1] + 1)


def direct_conv_applies(x: torch.Tensor, other: torch.Tensor, kernel_hw: tuple[int, int],
                        padding: tuple[int, int]) -> bool:
    """Whether the direct convolution kernels take a stride-1 convolution of ``x`` [N, C, H, W]
    with ``other`` (its weight, or for a weight gradient its errors) and ``kernel_hw``: compiled
    kernels, int8 CPU operands (in any layout: the kernels copy others to contiguous ones), at
    most ``DIRECT_MAX_COLUMNS`` products per output and ``DIRECT_MAX_POSITIONS`` output positions
    per plane."""
    if (library() is None or x.dim() != 4 or other.dim() != 4 or x.dtype != torch.int8
            or other.dtype != torch.int8 or not x.is_cpu or not other.is_cpu):
        return False
    ho, wo = _direct_output_hw(x, kernel_hw, padding)
    return (x.shape[1] * kernel_hw[0] * kernel_hw[1] <= DIRECT_MAX_COLUMNS and min(padding) >= 0
            and ho >= 1 and wo >= 1 and ho * wo <= DIRECT_MAX_POSITIONS)


def _direct_call(function, *pointers_and_sizes) -> None:
    """Run a direct convolution kernel; it returns nonzero only when its buffers could not be
    allocated (its output is then not to be used)."""
    if function(*pointers_and_sizes):
        raise MemoryError(f"{function.__name__}: no memory for its buffers")


def conv_direct_forward(x: torch.Tensor, w: torch.Tensor, padding: tuple[int, int],
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """``conv2d(x, w, stride 1, padding)`` for int8 x [N, C, H, W] and w [O, C, kh, kw] that
    ``direct_conv_applies`` to, as int32 [N, O, Ho, Wo], computed directly (``native.c``), into
    ``out`` when given (contiguous int32 of that shape: a buffer that chunks of samples reuse,
    so that its pages are not faulted in anew for each). Threads take contiguous ranges of
    samples."""
    x, w = x.contiguous(), w.contiguous()
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    (ph, pw), (ho, wo) = padding, _direct_output_hw(x, (kh, kw), padding)
    if out is None:
        out = torch.empty((n, o, ho, wo), dtype=torch.int32)
    elif out.shape != (n, o, ho, wo) or out.dtype != torch.int32 or not out.is_contiguous():
        raise ValueError(f"conv_direct_forward writes int32 {(n, o, ho, wo)} contiguous, not {out.dtype} "
                         f"{tuple(out.shape)}")
    _direct_call(library().intrain_conv_direct_forward, x.data_ptr(), w.data_ptr(), out.data_ptr(), n, c, h, wd, o,
                 kh, kw, ph, pw, _threads(out.numel() * c * kh * kw))
    return out


def conv_direct_weight_grad(d: torch.Tensor, x: torch.Tensor, kernel_hw: tuple[int, int],
                            padding: tuple[int, int]) -> torch.Tensor:
    """The stride-1 weight gradient ``sum_n,y,x d[n, o, y, x] * x_padded[n, c, y + i, x + j]`` for
    int8 d [N, O, Ho, Wo] and x [N, C, H, W] that ``direct_conv_applies`` to, as int64 [O, C, kh,
    kw], computed directly (``native.c``). Threads take contiguous ranges of samples and their
    int64 sums are added: the same integers for any thread count."""
    d, x = d.contiguous(), x.contiguous()
    n, c, h, wd = x.shape
    o = d.shape[1]
    (kh, kw), (ph, pw), (ho, wo) = kernel_hw, padding, _direct_output_hw(x, kernel_hw, padding)
    total = torch.empty((o, c, kh, kw), dtype=torch.int64)
    _direct_call(library().intrain_conv_direct_weight_grad, d.data_ptr(), x.data_ptr(), total.data_ptr(), n, c, h,
                 wd, o, kh, kw, ph, pw, _threads(n * o * ho * wo * c * kh * kw))
    return total
