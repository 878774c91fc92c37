"""ActNN layers: torch.nn subclasses that keep compressed activations for backward."""
from .activation import QGELU, QReLU, QSiLU
from .base import QLayer
from .conv import QConv1d, QConv2d, QConv3d, QConvTranspose1d, QConvTranspose2d, QConvTranspose3d
from .dropout import QDropout
from .groupnorm import QGroupNorm, QLayerNorm
from .linear import QLinear
from .norm import QBatchNorm1d, QBatchNorm2d, QBatchNorm3d, QSyncBatchNorm
from .pool import QMaxPool2d
from .saved import held_bytes

LAYERS = (QConv1d, QConv2d, QConv3d, QConvTranspose1d, QConvTranspose2d, QConvTranspose3d,
          QLinear, QBatchNorm1d, QBatchNorm2d, QBatchNorm3d, QSyncBatchNorm, QGroupNorm, QLayerNorm,
          QReLU, QGELU, QSiLU, QDropout, QMaxPool2d)

__all__ = ['QLayer', 'LAYERS', 'held_bytes', 'QConv1d', 'QConv2d', 'QConv3d', 'QConvTranspose1d',
           'QConvTranspose2d', 'QConvTranspose3d', 'QLinear', 'QBatchNorm1d', 'QBatchNorm2d',
           'QBatchNorm3d', 'QSyncBatchNorm', 'QGroupNorm', 'QLayerNorm', 'QReLU', 'QGELU', 'QSiLU',
           'QDropout', 'QMaxPool2d']
