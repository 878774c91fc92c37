"""actnn_mm: activation-compressed training (ActNN) for PyTorch and OpenMMLab 2.0.

Usage, as in ActNN::

    import actnn_mm
    actnn_mm.set_optimization_level('L3')
    model = actnn_mm.QModule(model)
"""
from . import compress
from .config import config, set_optimization_level
from .convert import QModule, convert, revert
from .layers import (QBatchNorm1d, QBatchNorm2d, QBatchNorm3d, QConv1d, QConv2d, QConv3d,
                     QConvTranspose1d, QConvTranspose2d, QConvTranspose3d, QDropout, QLinear,
                     QMaxPool2d, QReLU, QSyncBatchNorm)

__version__ = '0.1.0'
__all__ = ['compress', 'config', 'set_optimization_level', 'QModule', 'convert', 'revert',
           'QConv1d', 'QConv2d', 'QConv3d', 'QConvTranspose1d', 'QConvTranspose2d',
           'QConvTranspose3d', 'QLinear', 'QBatchNorm1d', 'QBatchNorm2d', 'QBatchNorm3d',
           'QSyncBatchNorm', 'QReLU', 'QDropout', 'QMaxPool2d']
