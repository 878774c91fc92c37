# MoCo v2 ResNet-50, ImageNet, 200 epochs, with ActNN (L3), on ONE GPU.
#
# ActNN's published MoCo v2 result (linear-evaluation top-1 67.3 vs 67.7) was obtained with the
# 2-GPU variant, moco_r50_v2_2gpu.py (batch 512); see docs/openmmlab.md. Not measured here.
#
# ActNN choices
# - Batch: the official recipe is 8 GPUs x 32 = 256 at lr 0.03. With compressed activations the
#   whole batch of 256 (two 224x224 views each) fits on one GPU: same total batch, same lr and
#   schedule. If it does not fit, lower `batch_size` (it must divide queue_len=65536) and add
#   `--auto-scale-lr` (linear scaling rule, base_batch_size=256 below).
# - BN: MoCo's shuffle BN shuffles the key batch across GPUs; on one GPU it is a no-op, and the
#   statistics are those of the whole batch of 256 (as QSyncBN gives over 2 GPUs in the 2-GPU
#   variant).
# - Layers, two routes:
#   * registry types in the config (below): mmpretrain's ResNet takes conv_cfg and norm_cfg.
#     The momentum (key) encoder is a copy of backbone + neck, so it gets the same layers.
#   * `actnn=dict(level='L3')` for what is hard-coded: nn.ReLU and nn.MaxPool2d in ResNet, and the
#     whole MoCoV2Neck (nn.Linear, nn.ReLU; it takes no layer configs). tools/train.py turns the
#     key into `custom_imports` + the `ActNNHook`. The key encoder runs without gradients, so it
#     keeps no activations either way.
# - No frozen stages, norm_eval=False (self-supervised training from scratch, as upstream).
# - Level L3: 2 bits on average with per-sample, per-layer mixed precision (ActNN's default).
# - With numpy >= 2, mmcv 2.1.0's adjust_hue (ColorJitter hue=0.1 upstream) fails for negative
#   hue factors; tools/train.py and the ActNNHook fix it while the run goes (docs/openmmlab.md).
_base_ = 'mmpretrain::mocov2/mocov2_resnet50_8xb32-coslr-200e_in1k.py'

model = dict(
    backbone=dict(
        frozen_stages=-1,
        norm_eval=False,
        conv_cfg=dict(type='QConv2d'),
        norm_cfg=dict(type='QBN', requires_grad=True)))

# 1 GPU x 256 = the official total batch of 256 (8 GPUs x 32).
train_dataloader = dict(
    batch_size=256,
    num_workers=8,
    # Restated without the `_scope_` key that mmengine adds to every typed dict of a base from
    # another package ('mmpretrain::...'): the Runner passes a collate_fn's keys to the function
    # itself, and default_collate() refuses `_scope_`.
    collate_fn=dict(_delete_=True, type='default_collate'))

# Unchanged lr 0.03 for the total batch of 256; `--auto-scale-lr` rescales it.
optim_wrapper = dict(optimizer=dict(lr=0.03))
auto_scale_lr = dict(enable=False, base_batch_size=256)

actnn = dict(level='L3')
