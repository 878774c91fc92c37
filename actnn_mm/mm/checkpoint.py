"""Loading mmengine checkpoints under torch's ``weights_only`` default (torch >= 2.6).

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``, so torch refuses the checkpoints
mmengine itself writes: their message hub pickles ``HistoryBuffer`` objects, numpy arrays and
``getattr`` references to methods, and no allow-list of types can admit ``getattr`` safely.
Instead of turning the safety off for every file, :func:`trusted_checkpoints` replaces mmengine's
local loader, while the context lasts, by one that trusts a single folder (a run's own work_dir:
the files its runner wrote, e.g. for ``--resume``) and hands every other file to the loader it
replaced, which loads it as torch does, with ``weights_only=True``. Plain state dicts
(pretrained weights) load either way. Importing ``actnn_mm`` changes nothing here.
"""
import contextlib
import os
import os.path as osp
from typing import Callable, Iterator, Optional, Union

import torch
from mmengine.runner.checkpoint import CheckpointLoader

Loader = Callable[[str, Optional[Union[str, torch.device]]], dict]


def _local_loader() -> Loader:
    """The loader mmengine uses now for local paths."""
    return CheckpointLoader._schemes['']


def _install(loader: Loader) -> None:
    CheckpointLoader.register_scheme(prefixes='', loader=loader, force=True)


@contextlib.contextmanager
def trusted_checkpoints(directory: str) -> Iterator[None]:
    """Load the checkpoints below ``directory`` without ``weights_only`` while the context lasts.

    Contexts nest: each trusts its folder and hands other files to the loader in place when it
    was entered; on exit that loader is back (unless someone replaced this one meanwhile).

    Args:
        directory: a folder whose files this process trusts, e.g. the run's own work_dir.
    """
    root = osp.realpath(directory)
    previous = _local_loader()

    def load_from_local(filename: str,
                        map_location: Optional[Union[str, torch.device]] = None) -> dict:
        """mmengine's local loader, with ``weights_only=False`` below the trusted folder."""
        path = osp.realpath(osp.expanduser(filename))
        if not path.startswith(root + os.sep):
            return previous(filename, map_location)
        if not osp.isfile(path):
            raise FileNotFoundError(f'{filename} can not be found.')
        return torch.load(path, map_location=map_location, weights_only=False)

    _install(load_from_local)
    try:
        yield
    finally:
        if _local_loader() is load_from_local:
            _install(previous)
