"""OpenMMLab 2.0 glue: registry names, ActNNHook, the ``actnn=`` config key, CPU-DDP and CPU
mixed-precision helpers, and fixes for the pinned stack that hold only inside
:func:`compat_fixes` (importing this package changes no behaviour of mmengine or mmcv)."""
from . import registry
from .checkpoint import trusted_checkpoints
from .compat import compat_fixes
from .config import apply_actnn_key
from .dist import setup_cpu_distributed
from .hooks import ActNNHook
from .optim import CPUAmpOptimWrapper

__all__ = ['ActNNHook', 'CPUAmpOptimWrapper', 'apply_actnn_key', 'compat_fixes',
           'setup_cpu_distributed', 'trusted_checkpoints', 'registry']
