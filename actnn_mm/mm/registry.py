"""ActNN layers in mmengine's root ``MODELS`` registry, so every OpenMMLab codebase's
``conv_cfg`` / ``norm_cfg`` / ``act_cfg`` can name them (mmcv builds layers from the root).

GroupNorm has no name here: mmcv's ``build_norm_layer`` passes ``num_channels`` by keyword only
to ``nn.GroupNorm`` itself, so configs keep ``dict(type='GN')`` and the ActNNHook (or
``actnn_mm.QModule``) converts those layers in place."""
from mmengine.registry import MODELS

from .. import layers

NAMES = {
    'QConv1d': layers.QConv1d, 'QConv2d': layers.QConv2d, 'QConv3d': layers.QConv3d,
    'QConv': layers.QConv2d,
    'QConvTranspose1d': layers.QConvTranspose1d, 'QConvTranspose2d': layers.QConvTranspose2d,
    'QConvTranspose3d': layers.QConvTranspose3d,
    'QLinear': layers.QLinear,
    'QBN1d': layers.QBatchNorm1d, 'QBN2d': layers.QBatchNorm2d, 'QBN3d': layers.QBatchNorm3d,
    'QBN': layers.QBatchNorm2d, 'QSyncBN': layers.QSyncBatchNorm,
    'QLN': layers.QLayerNorm,
    'QReLU': layers.QReLU, 'QGELU': layers.QGELU, 'QSiLU': layers.QSiLU,
    'QDropout': layers.QDropout, 'QMaxPool2d': layers.QMaxPool2d,
}

for _name, _layer in NAMES.items():
    if MODELS.get(_name) is None:  # never override a name someone else registered
        MODELS.register_module(name=_name, module=_layer)
