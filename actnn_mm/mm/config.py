"""The ``actnn=dict(level=..., ...)`` key of any OpenMMLab config, turned into an ActNNHook."""
import importlib
import inspect
from typing import Any, Iterator, Optional, Tuple

from mmengine.config import Config, ConfigDict
from mmengine.registry import TRANSFORMS

from .hooks.actnn_hook import ActNNHook

_PACK_SUFFIX = 'Inputs'  # PackDetInputs, PackSegInputs, PackInputs, ...


def apply_actnn_key(cfg: Config) -> bool:
    """Turn a config's top-level ``actnn`` dict into ``custom_imports`` and an ActNNHook.

    Also adds ``sample_idx`` to the meta keys of the training pipeline's pack transforms, so the
    adaptive allocator learns per sample. The hook's arguments are checked now, so a bad key or
    level fails at start-up.

    Args:
        cfg: the config, changed in place.

    Returns:
        Whether the config had an ``actnn`` key.

    Raises:
        ValueError: an unknown level or setting in ``actnn``.
    """
    options = cfg.get('actnn')
    if options is None:
        return False
    if not isinstance(options, dict):
        raise ValueError(f"actnn must be a dict such as dict(level='L3'), got {options!r}")
    ActNNHook(**options)  # validates
    imports = cfg.setdefault('custom_imports', ConfigDict(imports=[], allow_failed_imports=False))
    if 'actnn_mm' not in imports.setdefault('imports', []):
        imports['imports'].append('actnn_mm')
    hooks = [h for h in cfg.get('custom_hooks', []) if h.get('type') != 'ActNNHook']
    cfg.custom_hooks = hooks + [dict(type='ActNNHook', **options)]
    for transform in _train_pack_transforms(cfg):
        keys = transform.get('meta_keys') or _default_meta_keys(transform['type'],
                                                               cfg.get('default_scope'))
        if keys is not None and 'sample_idx' not in keys:
            transform['meta_keys'] = tuple(keys) + ('sample_idx',)
    return True


def _default_meta_keys(name: str, scope: Optional[str]) -> Optional[Tuple[str, ...]]:
    """The ``meta_keys`` a pack transform keeps when the config does not list them."""
    if scope is not None and '.' not in name:
        importlib.import_module(f'{scope}.registry')  # the codebase's lazily filled registries
        name = f'{scope}.{name}'
    transform = TRANSFORMS.get(name)
    if transform is None:
        return None
    default = inspect.signature(transform).parameters.get('meta_keys')
    return None if default is None or default.default is inspect.Parameter.empty else \
        tuple(default.default)


def _train_pack_transforms(cfg: Config) -> Iterator[Any]:
    dataset = cfg.get('train_dataloader', {}).get('dataset', {})
    while 'dataset' in dataset and 'pipeline' not in dataset:  # wrappers: RepeatDataset, ...
        dataset = dataset['dataset']
    for transform in dataset.get('pipeline', []):
        if isinstance(transform, dict) and str(transform.get('type', '')).endswith(_PACK_SUFFIX):
            yield transform
