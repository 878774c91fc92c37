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
#   hue factors; tools/train.py and the ActNNHook fix it while the run goes (docs/openmmlab.md).
_base_ = './moco_r50_v2_1gpu.py'

# 2 GPUs x 256 images = 512 with batch statistics over both (QSyncBN) and the lr scaled linearly.
model = dict(backbone=dict(norm_cfg=dict(type='QSyncBN', requires_grad=True)))
optim_wrapper = dict(optimizer=dict(lr=0.06))
auto_scale_lr = dict(base_batch_size=512)  # the total batch lr 0.06 is meant for
