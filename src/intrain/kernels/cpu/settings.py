"""The cpu backend's tuned constants: one frozen :class:`CpuSettings` per backend."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CpuSettings:
    """The cpu backend's tuned constants: each trades speed (or memory) against another cost
    and changes no result bit. Frozen: a backend's settings never change; make another backend
    (``dataclasses.replace(settings, ...)``) to try other values.

    Each value is measured against its alternatives by ``python benchmarks/cpu_tuning.py --only
    NAME`` on the products of a real training step (LeNet-5 at batch 256, VGG-small-7 at width 1
    and batch 64; "dense" rows: the same with dense uniform errors). The numbers quoted are one
    run of ``--repeats 4`` (2026-12-01) on an Intel Xeon with AMX-INT8 and AVX-512 VNNI, 1 thread,
    process CPU time, on a machine shared with other jobs: the time of the products the constant
    affects, as a ratio against the chosen value (< 1: faster). Totals a constant cannot change
    varied by 0.8-1.2x there, so smaller differences mean nothing. An earlier full run on the
    same machine (``--repeats 4 --min-seconds 0``, no dense rows) is quoted in brackets where it
    differed.
    """

    #: Whether int8 x int8 products use ``torch._int_mm`` (exact int32 accumulation) instead of
    #: float units: None = automatically (where ``calibrate`` measured the int8 GEMM at 2x float32 or
    #: more, for wide enough layers), True =
    #: always, False = never. ``--only use_int8_gemm``: off (the float path) 1.56x [1.80x] on
    #: VGG-small-7, 1.02x on LeNet-5; on (every product) 0.95x [1.08x] on VGG, 2.43x on LeNet.
    use_int8_gemm: bool | None = None
    #: ... automatically only for convolutions with at least this many input and output channels:
    #: below it the im2col copy costs more than the product saves. ``--only
    #: int8_gemm_min_channels``: 1 (every convolution) 2.71x [3.04x] on LeNet-5's convolutions
    #: (1->6, 6->16), 1.14x [1.19x] on VGG-small-7's (its 3->128 forward 6.1x, though its weight
    #: gradient 0.6x); none (inf) 1.79x [2.17x] on VGG; 16 and 64 choose as 32 on both models.
    int8_gemm_min_channels: int = 32
    #: Bytes of int8 im2col columns the int8 GEMM's convolution products build at once: small
    #: chunks keep the temporaries (peak memory) small and in memory the allocator reuses, too
    #: small ones make many small products. ``--only int8_gemm_chunk_bytes`` (VGG-small-7; LeNet-5
    #: takes the float path): 1 MiB 1.77x [1.76x]; 16, 64, 256 MiB 0.96x, 0.89x, 0.99x [1.07x,
    #: 1.14x, 1.15x] at 1.35x, 2.01x, 2.17x the peak memory (127 MiB at 4 MiB).
    int8_gemm_chunk_bytes: int = 2**22
    #: Stride-1 convolutions of int8 operands with at most this many products per output (C * kh
    #: * kw; ``native.DIRECT_MAX_COLUMNS`` = 32 at most) and no int8 GEMM run forward and weight
    #: gradient on the C kernels for few input channels (``native.conv_direct_forward``), else
    #: on the float path. ``--only direct_conv_max_columns`` (one run of ``--repeats 6`` on an AMD
    #: EPYC Zen 4 with AVX-512 VNNI, 2026-12-03, 1 thread; 0 = never): 0 and 9 make LeNet-5's
    #: 1->6 layer 2.0-2.1x (forward) and 2.9-3.0x (weight gradient), its products 1.39-1.42x and
    #: their peak memory 2.02x; VGG-small-7's 3->128 layer (27 products per output) 1.4-1.5x and
    #: 1.6-2.0x with 0, 9 or 25, its products 1.01-1.02x.
    direct_conv_max_columns: int = 32
    #: More float32 blocks than this and one float64 call is cheaper (float64 GEMM runs at about
    #: half the float32 rate). ``--only max_f32_blocks_mm``: no effect on these steps (every
    #: linear product fits one float32 block; 1 to 64 within 0.97-1.01x).
    max_f32_blocks_mm: int = 3
    #: The same for convolutions (float64 convolution has no oneDNN kernel and runs 5-10x
    #: slower). ``--only max_f32_blocks_conv``: no effect on the recorded steps (one block
    #: almost everywhere); with dense errors 1 is 1.33x on VGG-small-7 (its 512->512 and 256->512
    #: input gradients 4.4x and 3.5x, in float64), while 4 to 64 give the same plans (0.95-1.02x:
    #: none needs more than 3 blocks there).
    max_f32_blocks_conv: int = 16
    #: ... except for weight gradients, split on samples: up to N / 3 blocks (float32 blocks of
    #: a few samples still beat a float64 weight-gradient convolution). ``--only
    #: min_samples_per_block``: no clear effect on these tensors (0.98-1.10x from 2 to inf, also
    #: with dense errors, whose long plans go to the grouped product first); 1 measured 1.22x
    #: [1.05x] on VGG-small-7's recorded step, whose plans it does not change: noise.
    min_samples_per_block: int = 3
    #: Weight-gradient plans of at most this many float32 sample blocks run as planned; longer
    #: ones try the grouped product and the split of d (below) first. ``--only
    #: grouped_min_blocks``: 0 1.11x [1.15x] on VGG-small-7 (its 128->128 layer 1.49x [1.70x]
    #: grouped instead of 2 blocks); 2 to 16 the same on the recorded steps; with dense errors 8
    #: and 16 are faster, 0.76x on LeNet-5 and 0.83-0.88x on VGG (5-block plans of LeNet's 6->16
    #: and VGG's 256->256 layers run 0.5-0.6x the time of the split that 4 leads to).
    grouped_min_blocks: int = 4
    #: Weight gradients of convolutions with at most this many weights per output channel
    #: (C*kh*kw: 25 for LeNet-5's first layer, 27 for VGG's) are computed by im2col and one
    #: batched product over groups of as many samples as keep each group's sum exact in float32:
    #: oneDNN's weight-gradient kernel is slow with one or three input channels. ``--only
    #: grouped_max_columns``: 0 makes VGG-small-7's 3->128 layer 1.71x [1.74x] and LeNet's 1->6
    #: layer 1.24x (2.13x with dense errors); 150 (LeNet-5's 6->16 layer grouped too) 1.25x on
    #: LeNet (that layer 1.62x), though 0.75x with dense errors; inf 1.21x LeNet, 1.22x [1.35x] VGG.
    grouped_max_columns: int = 32
    #: ... and of wider convolutions whose groups hold at most this many samples (after a long
    #: block plan). ``--only grouped_max_samples``: 0 1.07x on VGG-small-7 and 1.15x with dense
    #: errors (its 128->128 layer 1.34x: a 22-block plan instead of groups of 1); 2 to 16 1.08-1.11x
    #: on the recorded step, 0.93-0.99x with dense errors (16: VGG's 256->256 layer 0.67x in
    #: groups of 4).
    grouped_max_samples: int = 1
    #: Bytes of float32 im2col columns built at once by the grouped weight gradient (they are the
    #: largest temporary of LeNet-5's step). ``--only grouped_chunk_bytes``: 4, 16, 64 MiB raise
    #: LeNet-5's peak memory to 1.53x, 3.47x, 4.12x (of 7.9 MiB) at the same speed (0.91-1.09x);
    #: 0.5 and 1 MiB lower neither peak nor time.
    grouped_chunk_bytes: int = 2**21
    #: Weight gradients needing more float32 blocks than this try splitting the errors in two
    #: halves. ``--only split_min_blocks``: no effect on the recorded steps; with dense errors 8,
    #: 16 and inf are faster, 0.69-0.70x on LeNet-5 and 0.83-0.95x on VGG-small-7 (the 5-block
    #: plans of LeNet's 6->16 and VGG's 256->256 layers 0.5x the time of their split).
    split_min_blocks: int = 4
    #: Linear reductions are split on chunks of this many columns (the "grains"): finer grains
    #: give tighter blocks when blocks are needed, and cost a bound computation per grain.
    #: ``--only mm_grains``: LeNet-5 the same from 8 to 256; VGG-small-7's 8192->10 layer (8-10
    #: ms of products in a step of 1.4-2.9 s) 0.68-0.73x with 8 to 32 grains, 1.25x [0.89x] and
    #: 1.69x with 128 and 256 (its plans are one block: only the bound computation differs).
    mm_grains: int = 64
    #: Bytes of float32 data a float-path convolution product works on at once: results of the
    #: forward and input-gradient products (chunks requantised to int8 are kept in int16,
    #: requantize_chunks), float copies of the weight gradient's operands; oneDNN's own
    #: temporaries grow with the batch. ``--only float_chunk_bytes``: LeNet-5 (whose first
    #: layer's oneDNN call takes 12 MiB for a 3.4 MiB result) 0.86-0.88x unchunked or in 16-64 MiB
    #: chunks at 1.13x the peak memory (18.2 MiB at 4 MiB), 1.00x at 0.55x the peak in 1 MiB
    #: chunks; VGG-small-7 1.29x in 1 MiB chunks, 0.92-1.10x in larger ones at 1.15-1.26x the
    #: peak (149 MiB at 4 MiB).
    float_chunk_bytes: int = 2**22
