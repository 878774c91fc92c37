"""Distributed training on the CPU through mmengine (gloo).

mmengine 0.10.7's ``init_dist('pytorch')`` calls ``torch.cuda.set_device`` unconditionally, and its
default DDP wrapper passes ``device_ids=[LOCAL_RANK]``, which DDP refuses for a CPU module. Without
a GPU we therefore start the gloo process group ourselves (the Runner then skips its own) and ask
for a wrapper without device ids. DDP also refuses CPU modules holding torch's SyncBatchNorm, and
the Runner wraps the model before any hook runs: so with the ActNNHook, mmcv's ``SyncBN`` layers
are built as ``QSyncBN`` (QSyncBatchNorm, which synchronises over gloo) from the start. With GPUs
nothing changes: the hook converts SyncBatchNorm layers in place once DDP has wrapped the model.
"""
import os
from typing import Any

import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.registry import MODEL_WRAPPERS
from torch.nn.parallel import DistributedDataParallel

_SYNC_BN = 'SyncBN'  # mmcv's name of torch's SyncBatchNorm


def setup_cpu_distributed(cfg: Config) -> bool:
    """Start gloo and adapt ``cfg`` when launched with torchrun on a machine without a GPU.

    The DDP wrapper is the config's ``model_wrapper_cfg``, or else the one mmengine's Runner
    builds by default (``MMDistributedDataParallel`` with ``broadcast_buffers=False`` and the
    config's ``find_unused_parameters``), in either case without device ids. If ``custom_hooks``
    has the ActNNHook (e.g. from the ``actnn=`` key), every ``SyncBN`` layer under ``model`` is
    built as ``QSyncBN``: at levels that do not compress norm layers (L0, L1) it keeps its input
    in full precision and computes what SyncBatchNorm computes.

    Args:
        cfg: the config; ``model_wrapper_cfg`` is set when this returns True.

    Returns:
        Whether the process group was started here.
    """
    if torch.cuda.is_available() or dist.is_initialized() or 'RANK' not in os.environ:
        return False
    dist.init_process_group(backend='gloo')
    wrapper = cfg.get('model_wrapper_cfg') or dict(
        broadcast_buffers=False, find_unused_parameters=cfg.get('find_unused_parameters', False))
    wrapper.setdefault('type', 'MMDistributedDataParallel')
    wrapper_class = MODEL_WRAPPERS.get(wrapper['type'])  # None: a codebase's, found later
    if wrapper_class is None or issubclass(wrapper_class, DistributedDataParallel):
        wrapper['device_ids'] = None  # the Runner would pass [LOCAL_RANK] to DDP's subclasses
    cfg.model_wrapper_cfg = wrapper
    cfg.merge_from_dict({'env_cfg.dist_cfg.backend': 'gloo'})
    if any(isinstance(hook, dict) and hook.get('type') == 'ActNNHook'
           for hook in cfg.get('custom_hooks', [])):
        _use_qsync_bn(cfg.get('model'))
    return True


def _use_qsync_bn(node: Any) -> None:
    """Name ``QSyncBN`` in place of ``SyncBN`` in every layer config under ``node``, in place.

    Args:
        node: a config or a part of it (dict, list or value), e.g. ``cfg.model``.
    """
    if isinstance(node, (list, tuple)):
        for item in node:
            _use_qsync_bn(item)
    elif isinstance(node, dict):
        if node.get('type') == _SYNC_BN:
            node['type'] = 'QSyncBN'
        for value in node.values():
            _use_qsync_bn(value)
