"""Rounding modes against hand-computed cases, statistics on wide accumulators, int8 range."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from intrain.numeric import rng
from intrain.numeric.requant import requantize
from intrain.numeric.rounding import bit_length, max_bit_length, shift_round


def t(values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype)


def test_bit_length_matches_python():
    values = [0, 1, 2, 3, 4, 127, 128, 255, 256, 2**30, 2**31 - 1, 2**32, 2**40 + 5, 2**62, 2**63 - 1]
    values += [2**k + d for k in range(1, 63) for d in (-1, 0)]
    got = bit_length(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [v.bit_length() for v in values]
    assert max_bit_length(t([-300, 5, 200])).item() == 9


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_max_bit_length_at_the_extremes_of_each_dtype(dtype):
    info = torch.iinfo(dtype)
    for values in ([info.min], [info.max], [info.min + 1, 3], [0, 0], [-5, 4], [4, -3]):
        if dtype == torch.int64 and info.min in values:
            continue  # |int64 min| itself does not fit in int64; accumulators never get there
        expected = max(abs(v) for v in values).bit_length()
        assert max_bit_length(torch.tensor(values, dtype=dtype)).item() == expected


def test_nearest_hand_cases():
    a = t([5, -5, 6, -6, 7, -7, 4, 0, 1, -1])
    assert shift_round(a, 1, "nearest").tolist() == [3, -3, 3, -3, 4, -4, 2, 0, 1, -1]
    assert shift_round(a, 2, "nearest").tolist() == [1, -1, 2, -2, 2, -2, 1, 0, 0, 0]
    assert shift_round(a, 0, "nearest").tolist() == a.tolist()


def test_pseudo_stochastic_odd_shift():
    # s = 3: h = upper 2 discarded bits, l = lowest bit doubled; round up when h > l.
    # 13 = 0b1|101: h=0b10=2, l=1*2=2 -> down; 14 = 0b1|110: h=3, l=0 -> up; 11 = 0b1|011: h=1, l=2 -> down
    a = t([13, -13, 14, -14, 11, -11, 12, -12])
    assert shift_round(a, 3, "pseudo").tolist() == [1, -1, 2, -2, 1, -1, 2, -2]


def test_pseudo_stochastic_even_shift():
    # s = 4: 182 = 0b1011|0110: h=0b01=1, l=0b10=2 -> down (11); 185 = 0b1011|1001: h=2, l=1 -> up (12)
    a = t([182, -182, 185, -185, 176])
    assert shift_round(a, 4, "pseudo").tolist() == [11, -11, 12, -12, 11]


def test_pseudo_stochastic_shift_one_rounds_half_up_in_magnitude():
    assert shift_round(t([3, -3, 2, -2]), 1, "pseudo").tolist() == [2, -2, 1, -1]


def test_stochastic_is_floor_plus_the_key_noise():
    key = rng.derive_key(7, 3, rng.STREAM_ROUNDING)
    a = t([1000, -1000, 17, -17, 0, 5000])
    s = 4
    noise = rng.uniform_bits(key, a.shape, s)
    expected = [(abs(x) + int(r)) >> s for x, r in zip(a.tolist(), noise.tolist())]
    expected = [-m if x < 0 else m for x, m in zip(a.tolist(), expected)]
    assert shift_round(a, s, "stochastic", key).tolist() == expected
    assert shift_round(a, 0, "stochastic", key).tolist() == a.tolist()
    floors = (a.abs() >> s) * a.sign()
    diff = (shift_round(a, s, "stochastic", key) - floors).abs()
    assert int(diff.max()) <= 1


def test_stochastic_unbiased_on_one_value():
    # 1000 / 16 = 62.5: about half the draws must round up.
    a = torch.full((200_000,), 1000, dtype=torch.int32)
    key = rng.derive_key(1, 2, 3)
    mean = shift_round(a, 4, "stochastic", key).to(torch.int64).sum().item() / a.numel()
    assert abs(mean - 62.5) < 0.01


def _mean_error_in_ulps(a, s, mode, key=None):
    rounded = shift_round(a, s, mode, key).to(torch.int64)
    error = rounded * 2**s - a.to(torch.int64)
    return error.sum().item() / a.numel() / 2**s


def test_statistical_bias_on_wide_accumulators():
    """Tolerances: stochastic 0.005 ulp (6 standard errors of the mean of 10**6 draws); pseudo-stochastic
    rounding ignores the lowest floor(s/2) bits when deciding, which biases it by at most 2**-ceil(s/2) ulp."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-2**24, 2**24, (1_000_000,), generator=gen, dtype=torch.int32)
    key = rng.derive_key(11, 0, rng.STREAM_ROUNDING)
    for s in (6, 9, 10, 13):
        assert abs(_mean_error_in_ulps(a, s, "stochastic", key)) < 0.005, s
        assert abs(_mean_error_in_ulps(a, s, "pseudo")) < 2 ** -((s + 1) // 2) + 0.005, s
        # Magnitude bias, which the sign symmetry would hide in the signed mean above:
        assert abs(_mean_error_in_ulps(a.abs(), s, "pseudo")) < 2 ** -((s + 1) // 2) + 0.005, s
        assert abs(_mean_error_in_ulps(a.abs(), s, "stochastic", key)) < 0.005, s
    # Truncation, for contrast, is biased by half an ulp: the test can tell the difference.
    assert abs(_mean_error_in_ulps(a.abs(), 10, "pseudo") - (-0.5)) > 0.4


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-2**30 + 1, 2**30 - 1), min_size=1, max_size=64),
       st.sampled_from(["nearest", "stochastic", "pseudo"]))
def test_requantize_never_leaves_int8(values, mode):
    a = t(values)
    q = requantize(a, torch.tensor(0), mode=mode, key=(1, 2))
    assert q.v.dtype == torch.int8
    assert int(q.v.abs().max()) <= 127
    shift = int(q.e)
    assert shift == max(max(abs(v) for v in values).bit_length() - 7, 0)
    # Each value is within one unit of the exact quotient.
    exact = [v / 2**shift for v in values]
    assert all(abs(r - x) <= 1 for r, x in zip(q.v.tolist(), exact))


def test_requantize_worst_case_and_small_values():
    a = t([127 * 127 * 4608, -127 * 127 * 4608, 0])
    q = requantize(a, torch.tensor(-14), mode="nearest")
    # 74,323,968 has 27 bits: shift 20, 74323968 / 2**20 = 70.88 -> 71
    assert q.v.tolist() == [71, -71, 0] and int(q.e) == -14 + 20
    q = requantize(t([2**30 - 2**22, -(2**30 - 2**22)]), torch.tensor(0), mode="nearest")
    assert q.v.tolist() == [127, -127]  # (2**30 - 2**22) / 2**23 = 127.5 rounds to 128, clipped
    small = t([-100, 3, 127])
    q = requantize(small, torch.tensor(5))
    assert q.v.tolist() == [-100, 3, 127] and int(q.e) == 5


def test_requantize_int16():
    a = torch.tensor([2**40 + 12345, -(2**40)], dtype=torch.int64)
    q = requantize(a, torch.tensor(0), bits=16)
    assert q.v.dtype == torch.int16 and int(q.v.abs().max()) <= 32767 and int(q.e) == 41 - 15


def _python_round(v: int, s: int, mode: str, noise: int = 0) -> int:
    """sign(v) * round(|v| / 2**s) with Python's unbounded integers (never wraps)."""
    m = abs(v)
    if mode == "nearest":
        r = (m + (1 << s >> 1)) >> s
    elif mode == "stochastic":
        r = (m + noise) >> s
    else:  # pseudo: upper ceil(s/2) discarded bits against the lower floor(s/2), doubled if odd
        low, high = s >> 1, s - (s >> 1)
        kept = m & ((1 << s) - 1)
        r = (m >> s) + int((kept >> low) > ((kept & ((1 << low) - 1)) << (high - low)))
    return r if v >= 0 else -r


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("mode", ["nearest", "stochastic", "pseudo"])
def test_shift_round_never_wraps_at_the_dtype_limits(dtype, mode):
    """Values up to the dtype's maximum in magnitude, at every shift: the rounding constant or
    the noise added to a magnitude near the limit must not wrap (it did for nearest rounding of
    int32 sums above 2**31 - 2**(s-1): 131,071 products (-128)(-128) gave -128 at s = 24)."""
    top = torch.iinfo(dtype).max
    values = [top, -top, top - 1, -(top - 1), top - (1 << 6), 0, 1, -1, 3, -3]
    values += [(top >> k) + d for k in (1, 2, 7) for d in (-1, 0, 1)]
    values += [-v for v in values]
    a = torch.tensor(values, dtype=dtype)
    key = rng.derive_key(3, 1, rng.STREAM_ROUNDING)
    for s in range(torch.iinfo(dtype).bits - 1):
        got = shift_round(a, s, mode, key=key)
        assert got.dtype == dtype
        noise = (rng.uniform_bits(key, a.shape, torch.tensor(s), a.device).tolist()
                 if mode == "stochastic" else [0] * len(values))
        assert got.tolist() == [_python_round(v, s, mode, r) for v, r in zip(values, noise)], s
        # the shift as a 0-d tensor (how requantize passes it) gives the same bits
        assert torch.equal(shift_round(a, torch.tensor(s), mode, key=key), got)


def test_requantize_sum_of_131071_products_of_minus_128():
    """The largest int32 sum int8 operands can reach, 128 * 128 * 131,071 = 2**31 - 2**14:
    bit length 31, shift 24, 127.999 rounds to 128 and clips to 127 (not -127)."""
    top = 128 * 128 * 131071
    q = requantize(t([top, -top, top - 2**23, 2**23]), torch.tensor(0), mode="nearest")
    assert q.v.tolist() == [127, -127, 127, 1] and int(q.e) == 24
