"""The counter-based generator: reproducible, key-sensitive, uniform enough, integer only."""

import torch

from intrain.numeric import rng


def test_same_key_same_stream_and_scalar_matches_tensor_hash():
    key = rng.derive_key(0, 1, 2)
    assert torch.equal(rng.uint32(key, (1000,)), rng.uint32(key, (1000,)))
    x = torch.tensor([0, 1, 12345, 2**32 - 1], dtype=torch.int64)
    assert rng.mix32(x).tolist() == [rng._mix_int(int(v)) for v in x]


def test_keys_differ_by_every_part():
    base = rng.derive_key(1, 2, 3, 4)
    for other in [(0, 2, 3, 4), (1, 3, 3, 4), (1, 2, 4, 4), (1, 2, 3, 5), (1, 2 + 2**32, 3, 4)]:
        assert rng.derive_key(*other) != base


def test_uniformity_of_bits():
    bits = rng.uniform_bits(rng.derive_key(5), (400_000,), 4)
    assert int(bits.min()) == 0 and int(bits.max()) == 15
    counts = torch.bincount(bits, minlength=16)
    expected = 400_000 / 16
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert chi2 < 50  # 15 degrees of freedom; p ~ 1e-5
    words = rng.uint32(rng.derive_key(6), (400_000,))
    assert 0 <= int(words.min()) and int(words.max()) < 2**32
    assert abs(words.sum().item() / 400_000 / 2**32 - 0.5) < 0.003


def test_permutation_is_a_permutation_and_depends_on_seed_and_epoch():
    p = rng.permutation(1000, seed=3, epoch=0)
    assert sorted(p.tolist()) == list(range(1000))
    assert torch.equal(p, rng.permutation(1000, seed=3, epoch=0))
    assert not torch.equal(p, rng.permutation(1000, seed=4, epoch=0))
    assert not torch.equal(p, rng.permutation(1000, seed=3, epoch=1))


def test_uniform_bits_are_the_top_bits_of_one_63_bit_word_for_every_width():
    # The short path (bits <= 31 skips the low word) must give exactly the numbers of the
    # 63-bit word, as int and as 0-d tensor widths, at an offset, across the 31/32 boundary.
    key = rng.derive_key(11, 3)
    high = rng.uint32(key, (257,), offset=5) >> 1
    low = rng.uint32((key[0] ^ 0x5BD1E995, key[1]), (257,), offset=5)
    word = (high << 32) | low
    for bits in range(63):
        expected = word >> (63 - bits)
        assert torch.equal(rng.uniform_bits(key, (257,), bits, offset=5), expected), bits
        assert torch.equal(rng.uniform_bits(key, (257,), torch.tensor(bits), offset=5), expected), bits


def test_mix32_leaves_its_input_alone():
    x = torch.arange(1000, dtype=torch.int64) * 4_000_003 % 2**32
    before = x.clone()
    rng.mix32(x)
    assert torch.equal(x, before)


def test_chunked_hashing_gives_the_same_stream():
    key = rng.derive_key(9)
    whole = rng.uint32(key, (3, 1000), offset=77, chunk_elements=10**9)
    for chunk in (1, 7, 256, 2999, 3000):
        assert torch.equal(rng.uint32(key, (3, 1000), offset=77, chunk_elements=chunk), whole), chunk
    # chunks at an offset are pieces of the same stream
    assert torch.equal(rng.uint32(key, (500,), offset=1077, chunk_elements=64), whole.flatten()[1000:1500])
