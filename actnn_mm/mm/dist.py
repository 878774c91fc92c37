"""Distributed training on the CPU through mmengine (gloo).

mmengine 0.10.7's ``init_dist('pytorch')`` calls ``torch.cuda.set_device`` unconditionally, and its
default DDP wrapper passes ``device_ids=[LOCAL_RANK]``, which DDP refuses for a CPU module. Without
a GPU we therefore start the gloo process group ourselves (the Runner then skips its own) and ask
for a wrapper without device ids. With GPUs nothing changes.
"""
import os

import torch
import torch.distributed as dist
from mmengine.config import Config


def setup_cpu_distributed(cfg: Config) -> bool:
    """Start gloo and adapt ``cfg`` when launched with torchrun on a machine without a GPU.

    Args:
        cfg: the config; ``model_wrapper_cfg`` is set when this returns True.

    Returns:
        Whether the process group was started here.
    """
    if torch.cuda.is_available() or dist.is_initialized() or 'RANK' not in os.environ:
        return False
    dist.init_process_group(backend='gloo')
    cfg.model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None)
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
    return True
