# MoCo v2 ResNet-50, ImageNet, 200 epochs, with ActNN (L3), on 2 GPUs, batch 512:
#   tools/dist_train.sh configs/actnn/moco_r50_v2_2gpu.py 2
#
# This is the setting of ActNN's published MoCo v2 run: linear-evaluation top-1 67.3 vs 67.7
# (ActNN's number, not measured by this project; see docs/openmmlab.md).
#
# ActNN choices
# - Batch: 2 GPUs x 256 = 512, twice the official 8 GPUs x 32 = 256: with compressed activations
#   256 samples (two 224x224 views each) fit on one GPU. lr follows the linear scaling rule:
#   0.03 * 512 / 256 = 0.06 (set below). `auto_scale_lr` records that 0.06 is the lr for a total
#   batch of 512, so `--auto-scale-lr` rescales it when you change the batch or the GPU count
#   (the batch must divide queue_len=65536).
# - Norm: QSyncBN, the compressed SyncBatchNorm, in the backbone (and thus in the momentum key
#   encoder, a copy of it): batch statistics over all 512 samples of both GPUs (NCCL or gloo).
#   MoCo's shuffle BN still runs but no longer matters with synchronised statistics.
# - Layers: registry types for mmpretrain's ResNet (conv_cfg, norm_cfg); `actnn=dict(level=...)`
#   (ActNNHook) converts the hard-coded nn.ReLU/nn.MaxPool2d of ResNet and the MoCoV2Neck
#   (nn.Linear, nn.ReLU; it takes no layer configs).
# - No frozen stages, norm_eval=False (training from scratch, as upstream). Level L3.
# - With numpy >= 2, mmcv 2.1.0's adjust_hue (ColorJitter hue=0.1 upstream) fails for negative
#   hue factors; importing actnn_mm fixes it (see docs/openmmlab.md, Known issues).
_base_ = 'mmpretrain::mocov2/mocov2_resnet50_8xb32-coslr-200e_in1k.py'

model = dict(
    backbone=dict(
        frozen_stages=-1,
        norm_eval=False,
        conv_cfg=dict(type='QConv2d'),
        norm_cfg=dict(type='QSyncBN', requires_grad=True)))

# 2 GPUs x 256 = 512.
train_dataloader = dict(
    batch_size=256,
    num_workers=8,
    # Restated without the `_scope_` key that mmengine adds to every typed dict of a base from
    # another package ('mmpretrain::...'): the Runner passes a collate_fn's keys to the function
    # itself, and default_collate() refuses `_scope_`.
    collate_fn=dict(_delete_=True, type='default_collate'))

# Linear scaling rule: 0.03 at 256 -> 0.06 at 512.
optim_wrapper = dict(optimizer=dict(lr=0.06))
auto_scale_lr = dict(enable=False, base_batch_size=512)  # the total batch lr 0.06 is meant for

actnn = dict(level='L3')
