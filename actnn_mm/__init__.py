"""actnn_mm: activation-compressed training (ActNN) for PyTorch and OpenMMLab 2.0.

Usage, as in ActNN::

    import actnn_mm
    actnn_mm.set_optimization_level('L3')
    model = actnn_mm.QModule(model)
"""
from . import compress
from .config import config, set_optimization_level
from .convert import QModule, convert, revert
from .generic import compress_saved_tensors, report_uncompressed
from .layers import (QGELU, QBatchNorm1d, QBatchNorm2d, QBatchNorm3d, QConv1d, QConv2d, QConv3d,
                     QConvTranspose1d, QConvTranspose2d, QConvTranspose3d, QDropout, QGroupNorm,
                     QLayerNorm, QLinear, QMaxPool2d, QReLU, QSiLU, QSyncBatchNorm)
from .layers.state import set_sample_indices
from .stats import stats

__version__ = '0.1.0'

try:  # the OpenMMLab glue, when mmengine is installed: `custom_imports=['actnn_mm']` loads it
    import mmengine  # noqa: F401
except ImportError:
    pass
else:
    from . import mm  # noqa: F401
__all__ = ['compress', 'config', 'set_optimization_level', 'QModule', 'convert', 'revert',
           'set_sample_indices', 'stats', 'compress_saved_tensors', 'report_uncompressed',
           'QConv1d', 'QConv2d', 'QConv3d', 'QConvTranspose1d', 'QConvTranspose2d',
           'QConvTranspose3d', 'QLinear', 'QBatchNorm1d', 'QBatchNorm2d', 'QBatchNorm3d',
           'QSyncBatchNorm', 'QGroupNorm', 'QLayerNorm', 'QReLU', 'QGELU', 'QSiLU', 'QDropout',
           'QMaxPool2d']
