"""The cpu backend's tuned constants: one frozen :class:`CpuSettings` per backend."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CpuSettings:
    """The cpu backend's tuned constants: each trades speed (or memory) against another cost
    and changes no result bit. Frozen: a backend's settings never change; make another backend
    (``dataclasses.replace(settings, ...)``) to try other values."""

    #: Whether int8 x int8 products use ``torch._int_mm`` (exact int32 accumulation) instead of
    #: float units: None = automatically (on CPUs with AMX-INT8, for wide enough layers), True =
    #: always, False = never.
    use_int8_gemm: bool | None = None
    #: ... automatically only for convolutions with at least this many input and output channels:
    #: below it the im2col copy costs more than the product saves. Measured on an AMX machine, 2
    #: threads, tensors of real training steps (throwaway script, two runs): LeNet-5 (1->6, 6->16
    #: channels) forward 3.1-4.1x slower on the int8 GEMM, input gradient 1.5-2.5x, weight gradient
    #: 1.1-2.5x; VGG-small-7's 3->128 layer forward 1.6x slower; its other layers 0.17-0.76x.
    int8_gemm_min_channels: int = 32
    #: Bytes of int8 im2col columns the int8 GEMM's convolution products build at once. Small
    #: chunks keep the temporaries small (peak memory) and in memory the allocator reuses: seven
    #: VGG-small-7 products took 339 ms in 4 MiB chunks, 336 ms in 16 MiB and 471 ms in 256 MiB
    #: ones (1 thread, a training run beside it, throwaway script).
    int8_gemm_chunk_bytes: int = 2**22
    #: More float32 blocks than this and one float64 call is cheaper (float64 GEMM runs at about
    #: half the float32 rate; float64 convolution has no oneDNN kernel and runs 5-10x slower).
    max_f32_blocks_mm: int = 3
    max_f32_blocks_conv: int = 16
    #: ... except for weight gradients, split on samples: up to N / 3 blocks (measured: float32
    #: blocks of 3-4 samples beat a float64 weight-gradient convolution, blocks of 1 do not).
    min_samples_per_block: int = 3
    #: Weight-gradient plans of at most this many float32 sample blocks run as planned; longer
    #: ones try the grouped product and the split of d (below) first. Measured on this machine, 2
    #: threads, tensors of a VGG-small-7 training step at batch 64 (throwaway script): the
    #: 128->128 layer at 32x32 took 73.9 ms in 2 blocks against 154.2 ms grouped (groups of 1
    #: sample); the 3->128 layer 3.9 ms in 5 blocks against 3.0 ms grouped; LeNet-5's first layer
    #: (batch 256) 1.4 ms in 3 blocks against 1.8 ms grouped.
    grouped_min_blocks: int = 4
    #: Weight gradients of convolutions with at most this many weights per output channel
    #: (C*kh*kw: 25 for LeNet-5's first layer, 9 or 27 for VGG's) are computed by im2col and one
    #: batched product over groups of as many samples as keep each group's sum exact in float32:
    #: oneDNN's weight-gradient kernel is slow with one or three input channels. Measured on this
    #: machine, quiet, 2 threads, tensors from a LeNet-5 training step at batch 256 (throwaway
    #: script): first layer (25 columns) 6.6-7.4 ms grouped against 9.4-13.3 ms on sample blocks;
    #: second layer (150 columns) 7.5-9.4 ms grouped against 3.0-4.9 ms on sample blocks, so it
    #: stays on the blocks.
    grouped_max_columns: int = 32
    #: ... and of wider convolutions whose groups hold at most this many samples. Measured on this
    #: machine, quiet, 2 threads, ReLU-like x and pooled (3/4 zero) d (throwaway script): groups
    #: of 1 (32x32 outputs at batch 64, 28x28 at batch 256) 1.2-1.6x faster than the block plans;
    #: groups of 4-5 (16x16, 14x14) 0.7-1.0x, so those stay on the block plans.
    grouped_max_samples: int = 1
    #: Bytes of float32 im2col columns built at once by the grouped weight gradient (small: they
    #: are the largest temporary of LeNet-5's step; 2 MiB instead of 64 took its peak tensor
    #: memory from 27.6 to 17.9 MiB at the same speed, one run each of a throwaway script using
    #: benchmarks/speed.py's peak measure).
    grouped_chunk_bytes: int = 2**21
    #: Weight gradients needing more float32 blocks than this try splitting the errors in two
    #: halves.
    split_min_blocks: int = 4
    #: Linear reductions are split on chunks of this many columns (the "grains").
    mm_grains: int = 64
    #: Bytes of float32 data a float-path convolution product works on at once: results of the
    #: forward and input-gradient products (chunks requantised to int8 are kept in int16,
    #: requantize_chunks), float copies of the weight gradient's operands. oneDNN's own
    #: temporaries grow with the batch. Chunking small products costs time: LeNet-5 at batch 256
    #: (whose first layer's oneDNN call alone takes 12 MiB for a 3.4 MiB result) measured 1.40x /
    #: 0.96x (step time / peak memory against float32) unchunked, 1.51x / 0.67x in 2 MiB chunks,
    #: 1.56x / 0.47x in 1 MiB chunks (benchmarks/speed.py, one run each), so products below this
    #: size are not chunked; on VGG-small-7's float path 4 MiB took the peak to 0.42x (0.52x at
    #: 16 MiB) at the same speed.
    float_chunk_bytes: int = 2**22
