# Faster R-CNN R50-FPN 1x COCO with ActNN (L3), on ONE GPU.
#
# ActNN's published run of this preset: box mAP 37.4 vs 37.4 for the official 8-GPU model
# (ActNN's number, not measured by this project; see docs/openmmlab.md).
#
# ActNN choices
# - Batch: the official schedule is 8 GPUs x 2 images = 16. ActNN keeps the activations in about
#   2 bits, so the whole batch of 16 fits on one GPU: the same total batch, hence the same lr (0.02)
#   and schedule as upstream, no rescaling. If 16 does not fit on your GPU, lower `batch_size`
#   and run `tools/train.py ... --auto-scale-lr` (linear scaling rule, base_batch_size=16 below).
# - Layers, two routes:
#   * registry types in the config (below) where the upstream module takes a conv_cfg/norm_cfg:
#     ResNet (conv_cfg, norm_cfg) and FPN (conv_cfg). FPN's norm_cfg/act_cfg are None upstream
#     (plain convs, no norm, no activation): they stay None, the architecture is unchanged.
#   * `actnn=dict(level='L3')` for what mmdet hard-codes: nn.ReLU and nn.MaxPool2d in ResNet,
#     nn.Conv2d (+ F.relu) in RPNHead (it takes no conv_cfg), nn.Linear/nn.ReLU of
#     Shared2FCBBoxHead (no convs, so its conv_cfg would do nothing). tools/train.py turns the key
#     into `custom_imports` + the `ActNNHook`, which converts them before training.
# - frozen_stages=1 and norm_eval=True as upstream: frozen layers need no gradient, so the
#   ActNN layers run the plain op there and keep nothing; BN stays in eval mode (running
#   statistics of the pretrained model) with trainable affine parameters.
# - Level L3: 2 bits on average, mixed precision per sample and per layer; this is the level of
#   ActNN's reference results. L2 (4 bits everywhere) if you want a safety margin.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        frozen_stages=1,
        norm_eval=True,
        conv_cfg=dict(type='QConv2d'),
        norm_cfg=dict(type='QBN', requires_grad=True),
        # the real ImageNet initialisation, as upstream (tests on offline machines set None)
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')),
    neck=dict(conv_cfg=dict(type='QConv2d')))

# 1 GPU x 16 images = the official total batch of 16 (8 GPUs x 2).
train_dataloader = dict(batch_size=16, num_workers=8)

# Unchanged lr 0.02 for the total batch of 16; `--auto-scale-lr` rescales it if you change the
# batch (new lr = 0.02 * total batch / 16).
optim_wrapper = dict(optimizer=dict(lr=0.02))
auto_scale_lr = dict(enable=False, base_batch_size=16)

# Activation compression for everything the config route above cannot reach.
actnn = dict(level='L3')
