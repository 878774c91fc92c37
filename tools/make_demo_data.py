#!/usr/bin/env python
"""Writes small, learnable datasets in the real on-disk formats of COCO, Cityscapes and ImageNet.

The data are drawn, not downloaded: coloured shapes on a textured background, one shape (and colour)
per class, so a detector, a segmenter or a contrastive learner has something to fit within a few
iterations. The files are read by the real dataset classes (mmdet ``CocoDataset``, mmseg
``CityscapesDataset``, mmpretrain ``ImageNet``) with only ``data_root`` changed::

    <out>/coco/{train2017,val2017}/*.jpg
    <out>/coco/annotations/instances_{train2017,val2017}.json   (boxes + polygon masks)
    <out>/cityscapes/leftImg8bit/{train,val}/<city>/<city>_000000_0000NN_leftImg8bit.png
    <out>/cityscapes/gtFine/{train,val}/<city>/<city>_000000_0000NN_gtFine_labelTrainIds.png
    <out>/imagenet/{train,val}/<wnid>/<wnid>_N.JPEG, <out>/imagenet/meta/{train,val}.txt

Example::

    python tools/make_demo_data.py data/demo --num-train 8 --num-val 4 --size 128
"""
import argparse
import json
import math
import os
import os.path as osp
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

# The 80 COCO categories with their official ids: the annotation files list all of them, as the
# real ones do, so COCO-trained configs (80 classes) and CocoMetric work unchanged.
COCO_CLASSES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',
    'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog',
    'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella',
    'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite',
    'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket', 'bottle',
    'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange',
    'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch', 'potted plant',
    'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote', 'keyboard', 'cell phone',
    'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'book', 'clock', 'vase', 'scissors',
    'teddy bear', 'hair drier', 'toothbrush')
COCO_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90)
# (category, shape, colour): one shape and one colour per class.
DET_OBJECTS = (('sports ball', 'circle', (220, 40, 40)),
               ('book', 'rectangle', (40, 70, 220)),
               ('kite', 'triangle', (40, 180, 60)))

# Cityscapes train ids and their official colours.
CS_ROAD, CS_BUILDING, CS_VEGETATION, CS_SKY, CS_CAR = 0, 2, 8, 10, 13
CS_COLORS = {CS_ROAD: (128, 64, 128), CS_BUILDING: (70, 70, 70), CS_VEGETATION: (107, 142, 35),
             CS_SKY: (70, 130, 180), CS_CAR: (0, 0, 142)}
CS_CITIES = {'train': ('aachen', 'bremen'), 'val': ('frankfurt', )}

# ImageNet-style classes (WordNet ids of real ImageNet classes) drawn as distinct patterns.
IN_CLASSES = (('n01440764', 'circle'), ('n01443537', 'rectangle'), ('n01484850', 'triangle'),
              ('n01491361', 'stripes'))


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth gradient with mild noise (uint8 HxWx3)."""
    base = rng.uniform(90, 170, size=3)
    ys = np.linspace(-20, 20, h)[:, None, None]
    xs = np.linspace(-20, 20, w)[None, :, None]
    img = base + ys * rng.uniform(-1, 1) + xs * rng.uniform(-1, 1) + rng.normal(0, 6, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> List[Tuple[float, float]]:
    """The outline of ``shape`` centred at (cx, cy) with half-size r, as (x, y) vertices."""
    if shape == 'circle':
        return [(cx + r * math.cos(2 * math.pi * k / 20), cy + r * math.sin(2 * math.pi * k / 20))
                for k in range(20)]
    if shape == 'rectangle':
        return [(cx - r, cy - 0.7 * r), (cx + r, cy - 0.7 * r), (cx + r, cy + 0.7 * r),
                (cx - r, cy + 0.7 * r)]
    if shape == 'triangle':
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    raise ValueError(shape)


def polygon_area(poly: Sequence[Tuple[float, float]]) -> float:
    xs = np.array([p[0] for p in poly])
    ys = np.array([p[1] for p in poly])
    return float(0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))


def jitter(rng: np.random.Generator, colour: Tuple[int, int, int]) -> Tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in colour)


def make_coco(root: str, num_train: int, num_val: int, size: int, seed: int) -> None:
    """COCO detection/instance segmentation: 1-4 shapes per image, boxes and polygon masks."""
    rng = np.random.default_rng(seed)
    name2id = dict(zip(COCO_CLASSES, COCO_IDS))
    categories = [dict(id=i, name=n, supercategory='demo') for n, i in zip(COCO_CLASSES, COCO_IDS)]
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    ann_id = 1
    img_id = 1
    for split, num in (('train2017', num_train), ('val2017', num_val)):
        os.makedirs(osp.join(root, split), exist_ok=True)
        images, annotations = [], []
        for _ in range(num):
            h = w = size
            img = Image.fromarray(background(rng, h, w))
            draw = ImageDraw.Draw(img)
            # Place objects in distinct cells of a 2x2 grid so they barely overlap.
            cells = rng.permutation(4)[:rng.integers(1, 5)]
            for cell in cells:
                cat, shape, colour = DET_OBJECTS[rng.integers(len(DET_OBJECTS))]
                cw, ch = w / 2, h / 2
                r = rng.uniform(0.22, 0.42) * min(cw, ch)
                cx = (cell % 2) * cw + rng.uniform(r + 1, cw - r - 1)
                cy = (cell // 2) * ch + rng.uniform(r + 1, ch - r - 1)
                poly = shape_polygon(shape, cx, cy, r)
                draw.polygon(poly, fill=jitter(rng, colour))
                xs = [p[0] for p in poly]
                ys = [p[1] for p in poly]
                x0, y0 = max(0.0, min(xs)), max(0.0, min(ys))
                x1, y1 = min(float(w), max(xs)), min(float(h), max(ys))
                annotations.append(dict(
                    id=ann_id, image_id=img_id, category_id=name2id[cat], iscrowd=0,
                    bbox=[round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    area=round(polygon_area(poly), 2),
                    segmentation=[[round(c, 2) for p in poly for c in p]]))
                ann_id += 1
            file_name = f'{img_id:012d}.jpg'
            img.save(osp.join(root, split, file_name), quality=95)
            images.append(dict(id=img_id, file_name=file_name, width=w, height=h))
            img_id += 1
        with open(osp.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
            json.dump(dict(info=dict(description='actnn_mm demo data'), licenses=[],
                           images=images, annotations=annotations, categories=categories), f)


def make_cityscapes(root: str, num_train: int, num_val: int, size: int, seed: int) -> None:
    """Street-like scenes (sky, buildings, trees, road, cars) with train-id label maps."""
    rng = np.random.default_rng(seed + 1)
    h, w = size, 2 * size  # Cityscapes' 1:2 aspect
    for split, num in (('train', num_train), ('val', num_val)):
        cities = CS_CITIES[split]
        for k in range(num):
            city = cities[k % len(cities)]
            label = np.full((h, w), CS_SKY, np.uint8)
            horizon = int(h * rng.uniform(0.45, 0.6))
            label[horizon:] = CS_ROAD
            x = 0
            while x < w:  # a skyline of buildings and trees standing on the horizon
                bw = int(rng.integers(w // 10, w // 4))
                top = int(rng.uniform(0.1, 0.4) * h)
                cls = CS_BUILDING if rng.random() < 0.65 else CS_VEGETATION
                label[top:horizon, x:x + bw] = cls
                x += bw
            for _ in range(int(rng.integers(1, 4))):  # cars on the road
                cw, chh = int(rng.integers(w // 10, w // 5)), int(rng.integers(h // 10, h // 6))
                cx = int(rng.integers(0, w - cw))
                cy = int(rng.integers(horizon, h - chh))
                label[cy:cy + chh, cx:cx + cw] = CS_CAR
            img = np.zeros((h, w, 3), np.float32)
            for cls, colour in CS_COLORS.items():
                img[label == cls] = colour
            img += rng.normal(0, 8, img.shape)
            stem = f'{city}_000000_{k:06d}'
            img_dir = osp.join(root, 'leftImg8bit', split, city)
            ann_dir = osp.join(root, 'gtFine', split, city)
            os.makedirs(img_dir, exist_ok=True)
            os.makedirs(ann_dir, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                osp.join(img_dir, f'{stem}_leftImg8bit.png'))
            Image.fromarray(label).save(osp.join(ann_dir, f'{stem}_gtFine_labelTrainIds.png'))


def make_imagenet(root: str, num_train: int, num_val: int, size: int, seed: int) -> None:
    """ImageNet layout: one folder per WordNet id, plus meta/{train,val}.txt annotation lists."""
    rng = np.random.default_rng(seed + 2)
    os.makedirs(osp.join(root, 'meta'), exist_ok=True)
    for split, num in (('train', num_train), ('val', num_val)):
        lines = []
        for k in range(num):
            label = k % len(IN_CLASSES)
            wnid, shape = IN_CLASSES[label]
            img = Image.fromarray(background(rng, size, size))
            draw = ImageDraw.Draw(img)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            if shape == 'stripes':
                step = max(4, size // 8)
                for x in range(0, size, 2 * step):
                    draw.rectangle([x, 0, x + step - 1, size], fill=colour)
            else:
                r = rng.uniform(0.25, 0.4) * size
                c = rng.uniform(r, size - r, 2)
                draw.polygon(shape_polygon(shape, c[0], c[1], r), fill=colour)
            rel = f'{wnid}/{wnid}_{k}.JPEG'
            os.makedirs(osp.join(root, split, wnid), exist_ok=True)
            img.save(osp.join(root, split, rel), format='JPEG', quality=95)
            lines.append(f'{rel} {label}\n')
        with open(osp.join(root, 'meta', f'{split}.txt'), 'w') as f:
            f.writelines(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('out', nargs='?', default='data/demo', help='output folder')
    parser.add_argument('--num-train', type=int, default=16, help='training images per dataset')
    parser.add_argument('--num-val', type=int, default=4, help='validation images per dataset')
    parser.add_argument('--size', type=int, default=128,
                        help='image height in pixels (Cityscapes images are twice as wide)')
    parser.add_argument('--datasets', nargs='+', default=['coco', 'cityscapes', 'imagenet'],
                        choices=['coco', 'cityscapes', 'imagenet'])
    parser.add_argument('--seed', type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    makers = dict(coco=make_coco, cityscapes=make_cityscapes, imagenet=make_imagenet)
    for name in args.datasets:
        makers[name](osp.join(args.out, name), args.num_train, args.num_val, args.size, args.seed)
        print(f'wrote {osp.join(args.out, name)}')


if __name__ == '__main__':
    main()
