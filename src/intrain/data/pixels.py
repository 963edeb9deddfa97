"""uint8 pixels -> int8 network inputs, with integer arithmetic only.

Input: uint8 ``[N, C, H, W]``, values p in 0..255. Output: int8, same shape, with
real value ``v * 2**PIXEL_EXPONENT`` (= ``v / 128``).

* No mean: ``v = p >> 1``, range [0, 127]; real value ~ p / 256 (exact for even p).
* Mean ``m_c`` (ints 0..255, one per channel): ``d = p - m_c`` in [-255, 255] and
  ``v = sign(d) * (|d| >> 1)`` (halving rounded toward zero), range [-127, 127];
  real value ~ (p - m_c) / 256, with ``|2 v - d| <= 1``.
  The rounding is odd-symmetric (``d -> -d`` gives ``v -> -v``), so there is no
  bias toward negative values as with a plain arithmetic shift, and a mean of all
  zeros gives exactly the no-mean result. The final clamp to [-127, 127] is a no-op
  kept as a guard; -128 is never produced.

Intermediates are int16; no floating-point tensor is ever created, on any device.
"""

from __future__ import annotations

import torch

__all__ = ["PIXEL_EXPONENT", "pixels_to_int8"]

PIXEL_EXPONENT = -7


def pixels_to_int8(images_u8: torch.Tensor, channel_mean: tuple[int, ...] | None = None) -> torch.Tensor:
    """uint8 [N,C,H,W] -> int8 with scale 2**-7; see the module docstring for ranges."""
    if not isinstance(images_u8, torch.Tensor) or images_u8.dtype != torch.uint8:
        raise TypeError(f"pixels_to_int8 expects a uint8 tensor, got "
                        f"{getattr(images_u8, 'dtype', type(images_u8).__name__)}")
    if images_u8.dim() != 4:
        raise ValueError(f"pixels_to_int8 expects [N, C, H, W], got shape {tuple(images_u8.shape)}")
    if channel_mean is None:
        return (images_u8 >> 1).view(torch.int8)  # 0..127: the same bytes as int8, no second copy
    c = images_u8.shape[1]
    mean = tuple(channel_mean)
    if len(mean) != c or not all(isinstance(m, int) and not isinstance(m, bool) and 0 <= m <= 255
                                 for m in mean):
        raise ValueError(f"channel_mean must be {c} ints in 0..255, got {channel_mean!r}")
    m = torch.tensor(mean, dtype=torch.int16, device=images_u8.device).view(1, c, 1, 1)
    d = images_u8.to(torch.int16) - m                      # [-255, 255]
    v = torch.where(d < 0, -((-d) >> 1), d >> 1)          # [-127, 127], rounds toward zero
    return v.clamp_(-127, 127).to(torch.int8)
