# FCN R50-D8, Cityscapes 512x1024, 80k iterations, with ActNN (L3), on 4 GPUs (as upstream):
#   tools/dist_train.sh configs/actnn/fcn_r50_4gpu.py 4
#
# The official recipe (4 GPUs x 2 crops, SyncBN, lr 0.01) with compressed activations, so the
# result stays comparable with the official mIoU 73.6.
#
# ActNN choices
# - Batch: 2 crops per GPU, 8 in total, as upstream. Larger batches fit, e.g.
#     tools/dist_train.sh configs/actnn/fcn_r50_4gpu.py 4 --auto-scale-lr \
#         --cfg-options train_dataloader.batch_size=4
#   (16 in total, lr 0.01 * 16 / 8 = 0.02 by the linear scaling rule, base_batch_size=8 below).
# - Norm: QSyncBN, the compressed SyncBatchNorm (upstream uses SyncBN): batch statistics over
#   all GPUs' crops. It works with NCCL and with gloo (CPU), and is not reverted to plain BN by
#   mmengine.
# - Layers: registry types for ResNetV1c (conv_cfg, norm_cfg) and both FCNHeads (conv_cfg,
#   norm_cfg, act_cfg); `actnn=dict(level='L3')` (ActNNHook) converts mmseg's hard-coded
#   nn.ReLU/nn.MaxPool2d in ResNetV1c and the heads' nn.Conv2d classifiers.
# - norm_eval=False, no frozen stages, as upstream. Level L3 (ActNN's default).
# - Pretrained backbone `open-mmlab://resnet50_v1c` inherited from upstream.
_base_ = './fcn_r50_1gpu.py'

# Batch statistics over all processes (QSyncBN), 4 GPUs x 2 images = the official total of 8.
# (Not named `sync_bn`: mmengine reads a top-level `sync_bn` as its own SyncBN conversion.)
norm_cfg = dict(type='QSyncBN', requires_grad=True)
model = dict(backbone=dict(norm_cfg=norm_cfg), decode_head=dict(norm_cfg=norm_cfg),
             auxiliary_head=dict(norm_cfg=norm_cfg))
train_dataloader = dict(batch_size=2, num_workers=2)
