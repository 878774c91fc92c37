"""Train a detector, segmentor or self-supervised model with activation compression.

The same flags and flow as mmdet's ``tools/train.py``; a top-level ``actnn=dict(level='L3', ...)``
in the config (or ``--cfg-options actnn.level=L3``) adds the ActNNHook::

    python tools/train.py configs/actnn/faster_rcnn_r50_1gpu.py
    tools/dist_train.sh configs/actnn/faster_rcnn_r50_8gpu.py 8

The run goes under :func:`actnn_mm.mm.compat_fixes` (resume under torch's ``weights_only``
default, mmcv's ``adjust_hue`` under numpy 2), also when the config names ActNN layers only.
"""
import argparse
import os
import os.path as osp

import torch
from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from actnn_mm.mm import apply_actnn_key, compat_fixes, setup_cpu_distributed


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a model (with ActNN)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument('--amp', action='store_true',
                        help='enable automatic mixed precision (bfloat16 autocast on the CPU)')
    parser.add_argument('--auto-scale-lr', action='store_true', help='enable automatic LR scaling')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from the given checkpoint, or the latest one in work_dir')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config, key=value (e.g. actnn.level=L2)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def build_config(args: argparse.Namespace) -> Config:
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    apply_actnn_key(cfg)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        collate = (cfg.get(loader) or {}).get('collate_fn')
        if isinstance(collate, dict):  # mmengine tags configs inherited across codebases with
            collate.pop('_scope_', None)  # _scope_, which the Runner passes on to the function
    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    if args.amp and torch.cuda.is_available():
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    elif args.amp:  # mmengine's AmpOptimWrapper needs a GPU
        cfg.optim_wrapper.type = 'CPUAmpOptimWrapper'
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise RuntimeError('--auto-scale-lr needs `auto_scale_lr.base_batch_size` in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    return cfg


def main() -> None:
    args = parse_args()
    cfg = build_config(args)
    if args.launcher == 'pytorch':
        setup_cpu_distributed(cfg)
    with compat_fixes(cfg.work_dir):
        runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
        runner.train()


if __name__ == '__main__':
    main()
