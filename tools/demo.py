"""`make demo`: generate the demo data, train the Faster R-CNN ActNN preset for a few iterations
at a small image size, evaluate it, and print what the compression saved.

    python tools/demo.py [--work-dir work_dirs/demo]
"""
import argparse
import os
import subprocess
import sys

from mmengine.runner import Runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tools'))
from train import build_config  # noqa: E402  (same flow as tools/train.py)

CONFIG = os.path.join(REPO, 'configs', 'demo', 'faster_rcnn_r50_demo.py')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--work-dir', default=os.path.join('work_dirs', 'demo'))
    args = parser.parse_args()
    os.chdir(REPO)
    if not os.path.exists('data/demo/coco/annotations/instances_val2017.json'):
        subprocess.run([sys.executable, 'tools/make_demo_data.py', 'data/demo', '--datasets',
                        'coco', '--num-train', '16', '--num-val', '4', '--size', '256'],
                       check=True)
    cfg = build_config(argparse.Namespace(
        config=CONFIG, cfg_options=None, launcher='none', work_dir=args.work_dir, amp=False,
        auto_scale_lr=False, resume=None))
    runner = Runner.from_cfg(cfg)
    runner.train()
    hub = runner.message_hub.log_scalars
    bits, mib, ratio = (hub[f'train/actnn/{k}'].current() for k in ('avg_bits', 'mib', 'ratio'))
    metrics = runner.val()
    print('\n== actnn_mm demo: Faster R-CNN R50-FPN, ActNN L3, demo data at 256 px ==')
    print(f'activations kept for backward in the last step: {mib:.1f} MiB, {ratio:.1f}x less than '
          f'full precision ({mib * ratio:.1f} MiB), {bits:.2f} bits per value on average')
    print('evaluation (8 iterations from scratch, so near zero):',
          {k: round(v, 4) for k, v in metrics.items() if k.endswith('bbox_mAP')})
    print(f'logs and checkpoint: {cfg.work_dir}')


if __name__ == '__main__':
    main()
