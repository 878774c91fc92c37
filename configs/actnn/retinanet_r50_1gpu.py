# RetinaNet R50-FPN 1x COCO with ActNN (L3), on ONE GPU.
#
# ActNN's published run of this preset: box mAP 36.3 vs 36.5 for the official 8-GPU model
# (ActNN's number, not measured by this project; see docs/openmmlab.md).
#
# ActNN choices
# - Batch: the official schedule is 8 GPUs x 2 images = 16 at lr 0.01. With activations in about
#   2 bits the whole batch of 16 fits on one GPU: same total batch, same lr and schedule. If it
#   does not fit, lower `batch_size` and add `--auto-scale-lr` (linear scaling rule,
#   base_batch_size=16 below).
# - Layers, two routes:
#   * registry types in the config (below) where the upstream module takes them: ResNet
#     (conv_cfg, norm_cfg), FPN (conv_cfg) and RetinaHead (conv_cfg, for its 4+4 stacked convs).
#     FPN's and RetinaHead's norm_cfg are None upstream (no norm), FPN's act_cfg is None (no
#     activation): they stay None, the architecture is unchanged. RetinaHead takes no act_cfg.
#   * `actnn=dict(level='L3')` for what mmdet hard-codes: nn.ReLU and nn.MaxPool2d in ResNet,
#     the ReLUs of RetinaHead's ConvModules (default act_cfg) and its nn.Conv2d retina_cls /
#     retina_reg. tools/train.py turns the key into `custom_imports` + the `ActNNHook`.
# - frozen_stages=1 and norm_eval=True as upstream (frozen layers keep nothing; BN in eval mode).
# - Level L3: 2 bits on average with per-sample, per-layer mixed precision (ActNN's default).
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        frozen_stages=1,
        norm_eval=True,
        conv_cfg=dict(type='QConv2d'),
        norm_cfg=dict(type='QBN', requires_grad=True),
        # the real ImageNet initialisation, as upstream (tests on offline machines set None)
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')),
    neck=dict(conv_cfg=dict(type='QConv2d')),
    bbox_head=dict(conv_cfg=dict(type='QConv2d')))

# 1 GPU x 16 images = the official total batch of 16 (8 GPUs x 2).
train_dataloader = dict(batch_size=16, num_workers=8)

# Unchanged lr 0.01 (RetinaNet's) for the total batch of 16.
optim_wrapper = dict(optimizer=dict(lr=0.01))
auto_scale_lr = dict(enable=False, base_batch_size=16)

actnn = dict(level='L3')
