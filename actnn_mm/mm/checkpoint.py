"""Loading mmengine checkpoints under torch's ``weights_only`` default (torch >= 2.6).

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``, so torch refuses the checkpoints
mmengine itself writes: their message hub pickles ``HistoryBuffer`` objects, numpy arrays and
``getattr`` references to methods, and no allow-list of types can admit ``getattr`` safely.
Instead of turning the safety off for every file, the local loader here (registered with
mmengine's ``CheckpointLoader``) trusts only the work directories of runs on this machine (the
files their own runner wrote, e.g. for ``--resume``) and loads every other file as torch does,
with ``weights_only=True``. Plain state dicts (pretrained weights) load either way.
"""
import os
import os.path as osp
from typing import List, Optional, Union

import torch
from mmengine.runner.checkpoint import CheckpointLoader

_trusted: List[str] = []


def trust_directory(path: str) -> None:
    """Load checkpoints below ``path`` (a run's own work_dir) without ``weights_only``."""
    real = osp.realpath(path)
    if real not in _trusted:
        _trusted.append(real)


def is_trusted(filename: str) -> bool:
    real = osp.realpath(filename)
    return any(real.startswith(root + os.sep) for root in _trusted)


@CheckpointLoader.register_scheme(prefixes='', force=True)
def load_from_local(filename: str,
                    map_location: Optional[Union[str, torch.device]] = None) -> dict:
    """mmengine's local loader, with ``weights_only=False`` only for trusted work dirs."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    return torch.load(filename, map_location=map_location, weights_only=not is_trusted(filename))
