"""actnn_mm: activation-compressed training (ActNN) for PyTorch and OpenMMLab 2.0."""
from . import compress

__version__ = '0.1.0'
__all__ = ['compress']
