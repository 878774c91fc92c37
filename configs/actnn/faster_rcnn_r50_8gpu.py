# Faster R-CNN R50-FPN 1x COCO with ActNN (L3), on 8 GPUs:
#   tools/dist_train.sh configs/actnn/faster_rcnn_r50_8gpu.py 8
#
# The official recipe (8 GPUs x 2 images, lr 0.02, 12 epochs) with compressed activations: the
# result stays comparable with the official mAP 37.4 while each GPU needs far less activation
# memory (room for larger images, a bigger backbone, or a smaller GPU).
#
# ActNN choices
# - Batch: 2 images per GPU, 16 in total, as upstream, so lr 0.02 unchanged. ActNN's point is
#   that much larger batches fit: e.g. 8 per GPU (64 in total) with
#     tools/dist_train.sh configs/actnn/faster_rcnn_r50_8gpu.py 8 --auto-scale-lr \
#         --cfg-options train_dataloader.batch_size=8
#   scales lr linearly to 0.02 * 64 / 16 = 0.08 (base_batch_size=16 below). Very large detection
#   batches usually also want a longer warm-up.
# - Norm: QBN, not QSyncBN. With norm_eval=True (upstream) the backbone BN runs in eval mode with
#   the pretrained running statistics, so synchronising batch statistics would change nothing;
#   FPN and the heads have no BN. (Use norm_cfg=dict(type='QSyncBN', requires_grad=True) together
#   with norm_eval=False if you train the BN statistics.)
# - Layers, two routes:
#   * registry types in the config (below): ResNet conv_cfg/norm_cfg, FPN conv_cfg. FPN's
#     norm_cfg/act_cfg are None upstream and stay None (architecture unchanged).
#   * `actnn=dict(level='L3')` (ActNNHook) for mmdet's hard-coded nn.ReLU/nn.MaxPool2d in ResNet,
#     RPNHead's nn.Conv2d and Shared2FCBBoxHead's nn.Linear/nn.ReLU.
# - frozen_stages=1, norm_eval=True as upstream (frozen layers keep nothing).
# - Level L3: 2 bits on average with per-sample, per-layer mixed precision (ActNN's default).
_base_ = './faster_rcnn_r50_1gpu.py'

# 8 GPUs x 2 images = the official total batch of 16: the 1-GPU preset's lr and schedule.
train_dataloader = dict(batch_size=2, num_workers=2)
