"""A fix for the pinned stack: mmcv 2.1.0's ``adjust_hue`` under numpy 2.

mmcv computes the hue shift as ``np.uint8(hue_factor * 255)``, counting on numpy 1 to wrap a
negative value around; numpy 2 raises OverflowError instead, so any pipeline with a hue jitter
(MoCo v2's ``ColorJitter(hue=0.1)``) crashes about every other image. The wrapper hands mmcv a
negative factor whose product with 255 is already wrapped into [0, 256), which is the shift numpy 1
produced; every other argument passes through unchanged.
"""
import functools

import mmcv
import numpy as np


class _WrappedHueFactor(float):
    """A negative hue factor whose 8-bit shift (``factor * 255``) wraps as numpy 1's cast did."""

    def __mul__(self, other: float) -> float:
        return float(int(float(self) * other) % 256)


def _fix_adjust_hue() -> None:
    original = mmcv.adjust_hue
    if getattr(original, '_actnn_fixed', False):
        return

    @functools.wraps(original)
    def adjust_hue(img: np.ndarray, hue_factor: float, backend=None) -> np.ndarray:
        if hue_factor < 0:
            hue_factor = _WrappedHueFactor(hue_factor)
        return original(img, hue_factor, backend=backend)

    adjust_hue._actnn_fixed = True
    mmcv.adjust_hue = mmcv.image.adjust_hue = adjust_hue


if int(np.__version__.split('.')[0]) >= 2 and mmcv.__version__ == '2.1.0':
    _fix_adjust_hue()
