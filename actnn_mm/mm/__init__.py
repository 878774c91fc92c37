"""OpenMMLab 2.0 glue: registry names, ActNNHook, the ``actnn=`` config key, CPU-DDP helpers."""
from . import compat, registry
from .checkpoint import trust_directory
from .config import apply_actnn_key
from .dist import setup_cpu_distributed
from .hooks import ActNNHook

__all__ = ['ActNNHook', 'apply_actnn_key', 'setup_cpu_distributed', 'trust_directory', 'registry']
