"""Tensor-ring (and tensor-train) linear layers: a dense ``[O, I]`` matrix held as a ring of cores.

The input size is factorised ``I = I1 x ... x In`` and the output size ``O = O1 x ... x Om``; core
``k`` of the ``d = n + m`` cores (input factors first, then output factors) has shape
``[r_{k-1}, D_k, r_k]`` with ``r_0 = r_d`` (the ring closes). The matrix is

    W[(i1..in), (o1..om)] = trace(G1[:, i1, :] @ ... @ Gn[:, in, :] @ Gn+1[:, o1, :] @ ... @ Gd[:, om, :]).

Tensor ring (Zhao et al. 2016; Pan et al. 2019): every rank is ``R``. Tensor train: the same
layer with ``r_0 = r_d = 1`` (``ring=False``), so the trace is a plain product. Parameters:
``sum_k r_{k-1} D_k r_k``.

Contraction. Each side's cores are merged into one tensor, ``A [r_0, I, r_n]`` and ``B [r_n, O,
r_0]``, in the order of least multiplications (matrix-chain dynamic programming over the side's
cores, ``merge_order``); then ``W = A2 @ B2`` with ``A2 [I, r_0 r_n]`` and ``B2 [r_0 r_n, O]``, and
a batch ``x [N, I]`` gives ``y = x @ A2 @ B2``, evaluated either as ``(x @ A2) @ B2`` (``N r^2 (I +
O)`` multiplications) or as ``x @ (A2 @ B2)`` (``I r^2 O + N I O``), whichever is cheaper for
this ``N`` (``r^2 = r_0 r_n``).

Integer version (``IntTensorRing``): cores are int8 weights with fixed exponents (each core is a
``TensorRingCore``, a weighted layer the integer update treats like any other). The side merges
run on weights only and are requantised to int8 after every pairwise contraction (nearest
rounding); everything on the data path is exact: ``x @ A2`` is an exact int32 sum (``|.| <=
127**2 I``), and its product with B2 an exact int64 sum (``<= 127**3 I r^2 < 2**63``), so both
orders give the same integers, ``x @ W`` for the integer matrix ``W = A2 @ B2``, and ``y`` is
that sum requantised once. Backward: ``dZ = dy @ B2^T`` and ``dx = dZ @ A2^T``, ``dA2 = x^T dZ``,
``dB2 = (x A2)^T dy`` are exact integer products; a side with one core takes its gradient as it
is, a merged side's gradient is requantised to int8 and sent down its merge tree like an error
(each step an exact product; leaf cores keep their exact gradients). ``dx`` is rounded like every
layer's error (the format's error rounding).

Initialisation (``fan_in`` of a core, used by ``layers.init``): an entry of ``W`` sums ``prod_k
r_k`` paths of products of ``d`` core entries, so its variance is ``prod_k r_k var(G_k)``; giving
core ``k`` the fan-in ``2 r_k D_k`` (input cores) or ``2 r_k`` (output cores) makes it ``prod 1/D_k
= 1/I`` up to the power-of-two rounding of each exponent, the scale of a dense layer of fan-in ``I``.
"""

from __future__ import annotations

import torch

from intrain.layers.base import IntModule, StepContext, WeightedIntModule
from intrain.numeric import rng
from intrain.numeric.formats import NITI_INT8, NumberFormat
from intrain.numeric.qtensor import QTensor


def ring_ranks(factors: int, rank: int, ring: bool) -> list[int]:
    """``[r_0, ..., r_d]`` for ``factors`` cores: all ``rank``, or 1 at both ends (tensor train)."""
    if rank < 1:
        raise ValueError(f"the tensor rank must be 1 or more, got {rank}")
    ranks = [rank] * (factors + 1)
    if not ring:
        ranks[0] = ranks[-1] = 1
    return ranks


def check_factors(factors: tuple[int, ...], size: int, what: str) -> None:
    """ValueError (one line) unless ``factors`` are positive integers whose product is ``size``."""
    product = 1
    for f in factors:
        product *= f
    if not factors or any(f < 1 for f in factors) or product != size:
        raise ValueError(f"{what} factors {'x'.join(map(str, factors)) or '(none)'} multiply to {product}, "
                         f"not the {what} size {size}")


def merge_order(dims: list[int], ranks: list[int]):
    """The cheapest order to merge a chain of cores ``[ranks[k], dims[k], ranks[k+1]]``: a binary
    tree of nested pairs of core indices (a leaf is an int), by matrix-chain dynamic programming;
    merging ``[a, P, b]`` with ``[b, Q, c]`` costs ``a P b Q c`` multiplications."""
    n = len(dims)
    size = [[1] * n for _ in range(n)]
    for i in range(n):
        size[i][i] = dims[i]
        for j in range(i + 1, n):
            size[i][j] = size[i][j - 1] * dims[j]
    cost = [[0] * n for _ in range(n)]
    tree: list[list] = [[i if i == j else None for j in range(n)] for i in range(n)]
    for length in range(2, n + 1):
        for i in range(n - length + 1):
            j = i + length - 1
            best = None
            for m in range(i, j):
                c = cost[i][m] + cost[m + 1][j] + ranks[i] * size[i][m] * ranks[m + 1] * size[m + 1][j] * ranks[j + 1]
                if best is None or c < best:
                    best, tree[i][j] = c, (tree[i][m], tree[m + 1][j])
            cost[i][j] = best
    return tree[0][n - 1]


def factored_is_cheaper(n: int, in_size: int, out_size: int, bond: int) -> bool:
    """Whether ``(x @ A2) @ B2`` takes fewer multiplications than ``x @ (A2 @ B2)`` for ``n`` rows."""
    return n * bond * (in_size + out_size) <= in_size * bond * out_size + n * in_size * out_size


class TensorRingShape:
    """The factorisation and ranks of a tensor-ring layer, with the derived sizes both versions use."""

    def __init__(self, in_factors: tuple[int, ...], out_factors: tuple[int, ...], rank: int, ring: bool = True):
        self.in_factors, self.out_factors = tuple(in_factors), tuple(out_factors)
        self.rank, self.ring = rank, ring
        self.dims = list(self.in_factors + self.out_factors)
        self.ranks = ring_ranks(len(self.dims), rank, ring)
        self.n_in = len(self.in_factors)
        self.in_size = _product(self.in_factors)
        self.out_size = _product(self.out_factors)
        self.bond = self.ranks[0] * self.ranks[self.n_in]
        self.in_tree = merge_order(self.dims[:self.n_in], self.ranks[:self.n_in + 1])
        out_tree = merge_order(self.dims[self.n_in:], self.ranks[self.n_in:])
        self.out_tree = _offset(out_tree, self.n_in)

    def core_shape(self, k: int) -> tuple[int, int, int]:
        return self.ranks[k], self.dims[k], self.ranks[k + 1]

    def core_fan_in(self, k: int) -> int:
        """See the module docstring (initialisation)."""
        return 2 * self.ranks[k + 1] * (self.dims[k] if k < self.n_in else 1)

    @property
    def parameters(self) -> int:
        return sum(a * b * c for a, b, c in map(self.core_shape, range(len(self.dims))))

    def __repr__(self) -> str:
        kind = "ring" if self.ring else "train"
        return (f"in={'x'.join(map(str, self.in_factors))}, out={'x'.join(map(str, self.out_factors))}, "
                f"rank={self.rank}, {kind}")


def _product(values) -> int:
    result = 1
    for v in values:
        result *= v
    return result


def _offset(tree, by: int):
    return tree + by if isinstance(tree, int) else (_offset(tree[0], by), _offset(tree[1], by))


def _sides_to_matrices(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A [r0, I, rn]`` and ``B [rn, O, r0]`` as ``A2^T [r0 rn, I]`` and ``B2^T [O, r0 rn]``, the
    bond index ``(a, b)`` flattened the same way in both."""
    r0, i, rn = a.shape
    a2t = a.permute(0, 2, 1).reshape(r0 * rn, i)
    b2t = b.permute(1, 2, 0).reshape(b.shape[1], r0 * rn)
    return a2t, b2t


def _matrices_to_sides(a2t: torch.Tensor, b2t: torch.Tensor, r0: int, rn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``_sides_to_matrices`` (for gradients)."""
    a = a2t.reshape(r0, rn, a2t.shape[1]).permute(0, 2, 1)
    b = b2t.reshape(b2t.shape[0], r0, rn).permute(2, 0, 1)
    return a.contiguous(), b.contiguous()


#: Bits per limb when a wide integer operand is split for the int8/int16 products of the kernels.
LIMB_BITS = 14


def limbs(a: torch.Tensor) -> list[torch.Tensor]:
    """int16 tensors ``l_k`` with ``a = sum_k l_k * 2**(LIMB_BITS k)`` exactly: the low limbs in
    ``[0, 2**14)`` and the last one signed (arithmetic shifts); one limb when ``a`` fits int16."""
    wide = a.to(torch.int64)
    parts = []
    while True:
        if bool((wide.abs() < 2**15).all()):
            return parts + [wide.to(torch.int16)]
        parts.append((wide & (2**LIMB_BITS - 1)).to(torch.int16))
        wide = wide >> LIMB_BITS


def wide_product(backend, name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The backend's product ``name`` of integer operands of any width, exactly (int64): a wide
    operand is split into int16 limbs, each limb's product is exact, and the limb products are
    added with their shifts. The caller bounds the exact result below 2**63."""
    if a.dtype in (torch.int8, torch.int16) and b.dtype in (torch.int8, torch.int16):
        return getattr(backend, name)(a, b)
    wide_first = a.dtype not in (torch.int8, torch.int16)
    total = None
    for k, limb in enumerate(limbs(a if wide_first else b)):
        part = getattr(backend, name)(*((limb, b) if wide_first else (a, limb))).to(torch.int64) << (LIMB_BITS * k)
        total = part if total is None else total + part
    return total


# ----------------------------------------------------------------------------- float

class FloatTensorRing(torch.nn.Module):
    """Float32 tensor-ring linear layer (no bias), the integer layer's twin."""

    def __init__(self, shape: TensorRingShape) -> None:
        super().__init__()
        self.shape = shape
        self.cores = torch.nn.ParameterList()
        for k in range(len(shape.dims)):
            std = (2.0 / shape.core_fan_in(k)) ** 0.5
            self.cores.append(torch.nn.Parameter(torch.randn(shape.core_shape(k)) * std))

    def _merge(self, tree) -> torch.Tensor:
        if isinstance(tree, int):
            return self.cores[tree]
        left, right = self._merge(tree[0]), self._merge(tree[1])
        a, p, b = left.shape
        _, q, c = right.shape
        return (left.reshape(a * p, b) @ right.reshape(b, q * c)).reshape(a, p * q, c)

    def matrix(self) -> torch.Tensor:
        """The dense ``[O, I]`` matrix the cores represent."""
        a2t, b2t = _sides_to_matrices(self._merge(self.shape.in_tree), self._merge(self.shape.out_tree))
        return b2t @ a2t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shape
        a2t, b2t = _sides_to_matrices(self._merge(s.in_tree), self._merge(s.out_tree))
        if factored_is_cheaper(x.shape[0], s.in_size, s.out_size, s.bond):
            return (x @ a2t.T) @ b2t.T
        return x @ (b2t @ a2t).T

    def extra_repr(self) -> str:
        return repr(self.shape)


# ----------------------------------------------------------------------------- integer

class TensorRingCore(WeightedIntModule):
    """One int8 core ``[r_left, D, r_right]`` of an ``IntTensorRing``: a weighted layer (its own
    exponent, gradient, update and average) whose products its ring computes."""

    def forward(self, x: QTensor, ctx: StepContext | None = None) -> QTensor:
        raise RuntimeError("a tensor-ring core is used by its IntTensorRing, not called alone")


class IntTensorRing(IntModule):
    """Integer tensor-ring linear layer ``y = requant(x @ W^T)`` (see the module docstring)."""

    def __init__(self, shape: TensorRingShape, backend, fmt: NumberFormat = NITI_INT8) -> None:
        super().__init__()
        self.shape = shape
        self.backend = backend
        self.fmt = fmt
        self.cores = torch.nn.ModuleList(
            TensorRingCore(shape.core_shape(k), shape.core_fan_in(k), backend, fmt) for k in range(len(shape.dims)))
        self._saved: tuple | None = None

    @property
    def has_weight(self) -> bool:
        return True

    def _merge(self, tree, saved: list) -> QTensor:
        """The side tensor of ``tree``, each pairwise merge an exact product requantised to the
        format (nearest); ``saved`` collects ``(tree, left, right)`` for backward."""
        if isinstance(tree, int):
            return self.cores[tree].weight_q
        left, right = self._merge(tree[0], saved), self._merge(tree[1], saved)
        a, p, b = left.v.shape
        _, q, c = right.v.shape
        product = self.backend.linear_forward(left.v.reshape(a * p, b), right.v.reshape(b, q * c).T.contiguous())
        merged = self.fmt.requantize(product, left.e + right.e)
        saved.append((tree, left, right))
        return QTensor(merged.v.reshape(a, p * q, c), merged.e)

    def sides(self) -> tuple[QTensor, QTensor, list]:
        """``A`` and ``B`` (int8 QTensors) and the merges made on the way."""
        saved: list = []
        a = self._merge(self.shape.in_tree, saved)
        b = self._merge(self.shape.out_tree, saved)
        return a, b, saved

    def matrix(self) -> QTensor:
        """The integer matrix ``W^T = (A2 @ B2)^T [O, I]`` the data path multiplies by, exactly
        (int32: ``|.| <= 127**2 r0 rn``)."""
        a, b, _ = self.sides()
        a2t, b2t = _sides_to_matrices(a.v, b.v)
        return QTensor(self.backend.linear_forward(b2t, a2t.T.contiguous()), a.e + b.e)

    def forward(self, x: QTensor, ctx: StepContext | None = None) -> QTensor:
        s = self.shape
        a, b, merges = self.sides()
        a2t, b2t = _sides_to_matrices(a.v, b.v)
        if factored_is_cheaper(x.v.shape[0], s.in_size, s.out_size, s.bond):
            z = self.backend.linear_forward(x.v, a2t)
            acc = wide_product(self.backend, "linear_forward", z, b2t)
        else:
            z = None
            acc = wide_product(self.backend, "linear_forward", x.v,
                               self.backend.linear_forward(b2t, a2t.T.contiguous()))
        if self.training:
            self._saved = (x, a, b, merges, z)
        return self.fmt.requantize(acc, x.e + a.e + b.e)

    def backward(self, d: QTensor, ctx: StepContext | None, need_input_grad: bool = True) -> QTensor | None:
        if self._saved is None:
            raise RuntimeError("IntTensorRing.backward called without a training-mode forward")
        x, a, b, merges, z = self._saved
        self._saved = None
        s = self.shape
        a2t, b2t = _sides_to_matrices(a.v, b.v)
        if z is None:
            z = self.backend.linear_forward(x.v, a2t)
        dz = self.backend.linear_backward_input(d.v, b2t)            # [N, r0 rn], exact
        grad_a2t = wide_product(self.backend, "linear_backward_weight", dz, x.v)   # [r0 rn, I]
        grad_b2t = wide_product(self.backend, "linear_backward_weight", d.v, z)    # [O, r0 rn]
        grad_a, grad_b = _matrices_to_sides(grad_a2t, grad_b2t, s.ranks[0], s.ranks[s.n_in])
        by_tree = {tree: (left, right) for tree, left, right in merges}
        self._down(s.in_tree, grad_a, d.e + x.e + b.e, by_tree)
        self._down(s.out_tree, grad_b, d.e + x.e + a.e, by_tree)
        if not need_input_grad:
            return None
        dx = wide_product(self.backend, "linear_backward_input", dz, a2t)
        return self._round_error(dx, d.e + a.e + b.e, ctx)

    def _round_error(self, acc: torch.Tensor, e: torch.Tensor, ctx: StepContext | None) -> QTensor:
        """The error for the layer below, rounded like ``WeightedIntModule.requantize_error`` does."""
        if self.fmt.error_rounding == "nearest":
            return self.fmt.requantize(acc, e)
        if ctx is None:
            raise ValueError("stochastic error rounding needs a StepContext")
        key = rng.derive_key(ctx.seed, ctx.step, self.layer_id, rng.STREAM_ROUNDING)
        return self.fmt.requantize(acc, e, mode="stochastic", key=key)

    def _down(self, tree, grad: torch.Tensor, e: torch.Tensor, by_tree: dict) -> None:
        """Send the exact gradient ``grad`` (exponent ``e``) of the side tensor of ``tree`` to its
        cores: a leaf keeps it, a merge rounds it to the format and multiplies it exactly with
        each operand to get the operands' gradients."""
        if isinstance(tree, int):
            core = self.cores[tree]
            core.weight_grad, core.weight_grad_exp = grad, e
            return
        left, right = by_tree[tree]
        error = self.fmt.requantize(grad, e)
        a, p, bond = left.v.shape
        _, q, c = right.v.shape
        dc = error.v.reshape(a * p, q * c)
        right2 = right.v.reshape(bond, q * c)
        left2 = left.v.reshape(a * p, bond)
        grad_left = self.backend.linear_forward(dc, right2).reshape(a, p, bond)          # dC @ R^T
        grad_right = self.backend.linear_backward_weight(left2, dc).reshape(bond, q, c)  # L^T @ dC
        self._down(tree[0], grad_left, error.e + right.e, by_tree)
        self._down(tree[1], grad_right, error.e + left.e, by_tree)

    def clear_saved(self) -> None:
        self._saved = None

    def extra_repr(self) -> str:
        return repr(self.shape)
