"""Fixes for the pinned stack, in force only inside :func:`compat_fixes`.

Importing ``actnn_mm`` changes no behaviour of mmengine or mmcv. ``tools/train.py`` and the
ActNNHook (so also the ``actnn=`` config key, which adds the hook) enter :func:`compat_fixes` for
the run; other scripts can enter it themselves. It applies:

* resume under torch's ``weights_only`` default: checkpoints below the run's work_dir load
  without ``weights_only`` (:func:`~actnn_mm.mm.checkpoint.trusted_checkpoints`);
* mmcv 2.1.0's ``adjust_hue`` under numpy 2: mmcv computes the hue shift as
  ``np.uint8(hue_factor * 255)``, counting on numpy 1 to wrap a negative value around; numpy 2
  raises OverflowError instead, so any pipeline with a hue jitter (MoCo v2's
  ``ColorJitter(hue=0.1)``) crashes about every other image. The wrapper hands mmcv a negative
  factor whose product with 255 is already wrapped into [0, 256), which is the shift numpy 1
  produced; every other argument passes through unchanged. Dataloader workers forked during
  the run keep it.
"""
import contextlib
import functools
from typing import Iterator, Optional

import numpy as np

from .checkpoint import trusted_checkpoints


class _WrappedHueFactor(float):
    """A negative hue factor whose 8-bit shift (``factor * 255``) wraps as numpy 1's cast did."""

    def __mul__(self, other: float) -> float:
        return float(int(float(self) * other) % 256)


@contextlib.contextmanager
def _adjust_hue_fixed() -> Iterator[None]:
    """``mmcv.adjust_hue`` accepting negative factors under numpy 2, while the context lasts
    (nothing changes under numpy 1, another mmcv, or inside another such context)."""
    import mmcv
    original = mmcv.adjust_hue
    if (int(np.__version__.split('.')[0]) < 2 or mmcv.__version__ != '2.1.0'
            or getattr(original, '_actnn_fixed', False)):
        yield
        return

    @functools.wraps(original)
    def adjust_hue(img: np.ndarray, hue_factor: float, backend: Optional[str] = None
                   ) -> np.ndarray:
        if hue_factor < 0:
            hue_factor = _WrappedHueFactor(hue_factor)
        return original(img, hue_factor, backend=backend)

    adjust_hue._actnn_fixed = True
    mmcv.adjust_hue = mmcv.image.adjust_hue = adjust_hue
    try:
        yield
    finally:
        if mmcv.adjust_hue is adjust_hue:  # unless someone replaced it meanwhile
            mmcv.adjust_hue = mmcv.image.adjust_hue = original


@contextlib.contextmanager
def compat_fixes(work_dir: str) -> Iterator[None]:
    """The module doc's fixes, in force while the context lasts; contexts nest.

    Args:
        work_dir: the run's work_dir, whose checkpoints (its own) load without ``weights_only``.
    """
    with trusted_checkpoints(work_dir), _adjust_hue_fixed():
        yield
