# RetinaNet R50-FPN 1x COCO with ActNN (L3), on 8 GPUs:
#   tools/dist_train.sh configs/actnn/retinanet_r50_8gpu.py 8
#
# The official recipe (8 GPUs x 2 images, lr 0.01, 12 epochs) with compressed activations, so the
# result stays comparable with the official mAP 36.5 at a fraction of the activation memory.
#
# ActNN choices
# - Batch: 2 images per GPU, 16 in total, as upstream (lr 0.01 unchanged). Larger batches fit:
#     tools/dist_train.sh configs/actnn/retinanet_r50_8gpu.py 8 --auto-scale-lr \
#         --cfg-options train_dataloader.batch_size=8
#   gives 64 in total and lr 0.01 * 64 / 16 = 0.04 (linear scaling rule, base_batch_size=16).
# - Norm: QBN, not QSyncBN: norm_eval=True (upstream) keeps the backbone BN in eval mode with the
#   pretrained statistics, so synchronising batch statistics would change nothing; FPN and the
#   head have no BN.
# - Layers: registry types for ResNet (conv_cfg, norm_cfg), FPN (conv_cfg) and RetinaHead
#   (conv_cfg); None norm/act settings stay None (architecture unchanged). `actnn=dict(level=...)`
#   (ActNNHook) converts what mmdet hard-codes: ResNet's nn.ReLU/nn.MaxPool2d, RetinaHead's
#   ConvModule ReLUs and its nn.Conv2d output layers.
# - frozen_stages=1, norm_eval=True as upstream. Level L3 (ActNN's default).
_base_ = './retinanet_r50_1gpu.py'

# 8 GPUs x 2 images = the official total batch of 16: the 1-GPU preset's lr and schedule.
train_dataloader = dict(batch_size=2, num_workers=2)
