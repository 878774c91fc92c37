# The `make demo` run: the Faster R-CNN ActNN preset on the generated demo data
# (tools/make_demo_data.py data/demo), at 256 px, a few iterations, then COCO evaluation.
_base_ = '../actnn/faster_rcnn_r50_1gpu.py'

data_root = 'data/demo/coco/'
# offline: no pretrained weights; after a few iterations every score is low, keep them all so
# that the evaluation has boxes to score
model = dict(backbone=dict(init_cfg=None), test_cfg=dict(rcnn=dict(score_thr=0.0)))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(256, 256), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(256, 256), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))]
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, ann_file='annotations/instances_train2017.json',
                 data_prefix=dict(img='train2017/'), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, ann_file='annotations/instances_val2017.json',
                 data_prefix=dict(img='val2017/'), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
# tools/demo.py evaluates after training (runner.val())
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=8, val_interval=1000)
optim_wrapper = dict(optimizer=dict(lr=0.01))
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=4)]
default_hooks = dict(logger=dict(interval=2), checkpoint=dict(by_epoch=False, interval=8))
log_processor = dict(by_epoch=False)
