# FCN R50-D8, Cityscapes 512x1024, 80k iterations, with ActNN (L3), on ONE GPU.
#
# ActNN's published run of this preset: mIoU 72.9 vs 73.6 for the official 4-GPU model
# (ActNN's number, not measured by this project; see docs/openmmlab.md).
#
# ActNN choices
# - Batch: the official recipe is 4 GPUs x 2 crops = 8 with SyncBN, lr 0.01. With activations in
#   about 2 bits all 8 crops of 512x1024 fit on one GPU: the same total batch, lr and schedule.
#   Plain (Q)BN over 8 crops on one GPU computes the same statistics as SyncBN over 4 x 2, so
#   QBN replaces SyncBN without changing the maths. If 8 does not fit, lower `batch_size` and
#   add `--auto-scale-lr` (linear scaling rule, base_batch_size=8 below).
# - Layers, two routes:
#   * registry types in the config (below): ResNetV1c (conv_cfg, norm_cfg) and both FCNHeads
#     (conv_cfg, norm_cfg, act_cfg; their act_cfg is ReLU by default, so QReLU changes nothing
#     but the saved activation).
#   * `actnn=dict(level='L3')` for what mmseg hard-codes: nn.ReLU and nn.MaxPool2d in ResNetV1c,
#     the nn.Conv2d classifier `conv_seg` of each head. tools/train.py turns the key into
#     `custom_imports` + the `ActNNHook`. (Dropout2d has no ActNN layer; it stays as it is.)
# - norm_eval=False and no frozen stages, as upstream: the BN statistics are trained.
# - Level L3: 2 bits on average with per-sample, per-layer mixed precision (ActNN's default).
# - The backbone starts from `pretrained='open-mmlab://resnet50_v1c'` (inherited from upstream;
#   tests on offline machines set model.pretrained=None).
_base_ = 'mmseg::fcn/fcn_r50-d8_4xb2-80k_cityscapes-512x1024.py'

norm_cfg = dict(type='QBN', requires_grad=True)
model = dict(
    backbone=dict(
        norm_eval=False,
        conv_cfg=dict(type='QConv2d'),
        norm_cfg=norm_cfg),
    decode_head=dict(
        conv_cfg=dict(type='QConv2d'),
        norm_cfg=norm_cfg,
        act_cfg=dict(type='QReLU')),
    auxiliary_head=dict(
        conv_cfg=dict(type='QConv2d'),
        norm_cfg=norm_cfg,
        act_cfg=dict(type='QReLU')))

# 1 GPU x 8 crops = the official total batch of 8 (4 GPUs x 2).
train_dataloader = dict(batch_size=8, num_workers=8)

# Unchanged lr 0.01 for the total batch of 8; `--auto-scale-lr` rescales it.
optim_wrapper = dict(optimizer=dict(lr=0.01))
auto_scale_lr = dict(enable=False, base_batch_size=8)

actnn = dict(level='L3')
