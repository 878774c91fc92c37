"""OpenMMLab 2.0 glue: registry names, ActNNHook, the ``actnn=`` config key, CPU-DDP and CPU
mixed-precision helpers."""
from . import compat, registry
from .checkpoint import trust_directory
from .config import apply_actnn_key
from .dist import setup_cpu_distributed
from .hooks import ActNNHook
from .optim import CPUAmpOptimWrapper

__all__ = ['ActNNHook', 'CPUAmpOptimWrapper', 'apply_actnn_key', 'setup_cpu_distributed',
           'trust_directory', 'registry']
