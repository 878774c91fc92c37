# The `make demo` run (tools/demo.py): the Faster R-CNN ActNN preset from scratch on 4 generated
# images (tools/make_demo_data.py, written to data/demo/coco/) at 128 px, batch 2: the network
# overfits them, so the loss falls within a few dozen iterations. No validation: so few iterations
# from scratch teach it those images, not detection.
_base_ = '../actnn/faster_rcnn_r50_1gpu.py'

data_root = 'data/demo/coco/'
model = dict(backbone=dict(init_cfg=None))  # offline: no pretrained weights
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    # endless shuffled passes: mmengine's loop sleeps 2 s at the end of each pass of a finite one
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(data_root=data_root, ann_file='annotations/instances_train2017.json',
                 data_prefix=dict(img='train2017/'), pipeline=train_pipeline))
val_dataloader = val_cfg = val_evaluator = None
test_dataloader = test_cfg = test_evaluator = None
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=40)
# 8x the preset's lr scaled to batch 2 (0.02 x 2 / 16), after a 4-iteration warm-up: overfits
# the images quickly
optim_wrapper = dict(optimizer=dict(lr=0.02))
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=4)]
default_hooks = dict(logger=dict(interval=10), checkpoint=None)
log_processor = dict(by_epoch=False)
# the weights, batch order and flips: the same in tools/demo.py's FP32 and L3 runs
randomness = dict(seed=0)
