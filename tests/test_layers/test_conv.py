"""QConv1d/2d/3d and QConvTranspose1d/2d/3d against torch: exact at L0, close at 8 bits, unbiased
at 2 bits; layouts, dtypes, autocast, padding modes and the no-compression fast paths."""
import copy

import pytest
import torch
from torch import nn

import actnn_mm
from actnn_mm.layers import conv as conv_module
from qchecks import assert_close_grads, assert_unbiased, grads, settings, spy_quantize

pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")

# (torch class, constructor kwargs, input shape)
CASES = {
    'conv1d': (nn.Conv1d, dict(in_channels=4, out_channels=6, kernel_size=3), (3, 4, 11)),
    'conv1d_circular': (nn.Conv1d, dict(in_channels=4, out_channels=6, kernel_size=3, padding=2,
                                        padding_mode='circular'), (3, 4, 11)),
    'conv2d_stride_pad': (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=3,
                                          stride=2, padding=1), (3, 4, 9, 9)),
    'conv2d_dilation_groups': (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=3,
                                               dilation=2, groups=2, bias=False), (3, 4, 9, 8)),
    'conv2d_depthwise': (nn.Conv2d, dict(in_channels=4, out_channels=4, kernel_size=3,
                                         padding=1, groups=4), (3, 4, 7, 7)),
    'conv2d_reflect': (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=3, padding=1,
                                       padding_mode='reflect'), (3, 4, 7, 8)),
    'conv2d_same_even_kernel': (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=4,
                                                padding='same'), (3, 4, 7, 7)),
    'conv2d_valid_rect': (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=(1, 3),
                                          padding='valid', stride=(2, 1)), (3, 4, 7, 7)),
    'conv3d_replicate': (nn.Conv3d, dict(in_channels=2, out_channels=3, kernel_size=3,
                                         padding=1, padding_mode='replicate'), (2, 2, 5, 4, 5)),
    'convt1d': (nn.ConvTranspose1d, dict(in_channels=4, out_channels=6, kernel_size=3,
                                         stride=2), (3, 4, 6)),
    'convt2d_outpad_groups': (nn.ConvTranspose2d, dict(in_channels=4, out_channels=6,
                                                       kernel_size=3, stride=2, padding=1,
                                                       output_padding=1, groups=2), (3, 4, 5, 5)),
    'convt2d_dilation': (nn.ConvTranspose2d, dict(in_channels=4, out_channels=3, kernel_size=2,
                                                  dilation=2, bias=False), (3, 4, 5, 4)),
    'convt3d': (nn.ConvTranspose3d, dict(in_channels=2, out_channels=3, kernel_size=2,
                                         stride=2), (2, 2, 3, 3, 3)),
}
# Relative tolerance of "exact" results (torch's against ActNN's): cuDNN may sum in another
# order from run to run, and differently for ActNN's call and torch's where their arguments differ
# (padding='same' with an even kernel: ActNN pads the whole excess itself).
EXACT = {'cpu': 1e-6, 'cuda': 1e-5}
Q = {nn.Conv1d: actnn_mm.QConv1d, nn.Conv2d: actnn_mm.QConv2d, nn.Conv3d: actnn_mm.QConv3d,
     nn.ConvTranspose1d: actnn_mm.QConvTranspose1d, nn.ConvTranspose2d: actnn_mm.QConvTranspose2d,
     nn.ConvTranspose3d: actnn_mm.QConvTranspose3d}


def make(case: str, channels_last: bool = False, dtype: torch.dtype = torch.float32,
         device: str = 'cpu'):
    """(torch module, the same converted, input) with shared weights' values, on ``device``."""
    cls, kwargs, shape = CASES[case]
    torch.manual_seed(0)
    ref = cls(**kwargs).to(device, dtype)
    x = torch.randn(shape, dtype=dtype).to(device)
    if channels_last:
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        ref, x = ref.to(memory_format=fmt), x.to(memory_format=fmt)
    q = copy.deepcopy(ref)
    q.__class__ = Q[cls]
    return ref, q, x


def layouts(case: str):
    return [False, True] if len(CASES[case][2]) >= 4 else [False]


@pytest.mark.parametrize('case,channels_last',
                         [(c, cl) for c in CASES for cl in layouts(c)])
def test_l0_equals_torch(case, channels_last, device):
    ref, q, x = make(case, channels_last, device=device)
    with settings('L0'):
        got = grads(q, [x])
    want = grads(ref, [x])
    assert_close_grads(got, want, rtol=EXACT[device])
    if channels_last:
        assert got['input0'].is_contiguous(memory_format=torch.channels_last
                                           if x.dim() == 4 else torch.channels_last_3d)


@pytest.mark.parametrize('case', list(CASES))
def test_8bit_close_and_only_weight_grad_approximate(case, device):
    ref, q, x = make(case, device=device)
    want = grads(ref, [x])
    with settings('L2', activation_compression_bits=[8]):
        got = grads(q, [x])
    assert_close_grads(got, want, rtol=2e-2)
    exact = {k: v for k, v in want.items() if k != 'weight'}
    assert_close_grads({k: got[k] for k in exact}, exact, rtol=EXACT[device])
    assert not torch.equal(got['weight'], want['weight'])  # really compressed


@pytest.mark.parametrize('case', ['conv1d_circular', 'conv2d_stride_pad',
                                  'conv2d_dilation_groups', 'conv2d_same_even_kernel',
                                  'conv3d_replicate', 'convt2d_outpad_groups', 'convt3d'])
def test_2bit_unbiased(case, device):
    ref, q, x = make(case, device=device)
    want = grads(ref, [x])
    with settings('L3'):
        assert_unbiased(lambda: grads(q, [x]), want, k=128, keys=['weight'])


@pytest.mark.parametrize('channels_last', [False, True])
def test_2bit_unbiased_channels_last_bf16_params(channels_last):
    ref, q, x = make('conv2d_stride_pad', channels_last, dtype=torch.bfloat16)
    want = grads(ref, [x])
    with settings('L3'):
        assert_unbiased(lambda: grads(q, [x]), want, k=128, keys=['weight'])
        assert grads(q, [x])['weight'].dtype == torch.bfloat16


def test_autocast_bf16_compresses_the_bf16_activation(monkeypatch):
    ref, q, x = make('conv2d_stride_pad')
    seen = spy_quantize(monkeypatch)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        want = grads(ref, [x])
        with settings('L0'):
            exact = grads(q, [x])
        assert not seen
        with settings('L2', activation_compression_bits=[8]):
            close = grads(q, [x])
        assert seen == [torch.bfloat16]
        with settings('L3'):
            assert_unbiased(lambda: grads(q, [x]), want, k=48, keys=['weight'])
    assert want['out'].dtype == torch.bfloat16 and want['weight'].dtype == torch.float32
    assert_close_grads(exact, want, rtol=1e-6)
    assert_close_grads(close, want, rtol=3e-2)


def test_transposed_output_size():
    ref, q, x = make('convt2d_outpad_groups')
    with settings('L0'):
        for size in ([10, 10], [9, 10], [3, 6, 9, 9]):
            got = grads(q, [x], output_size=size)
            want = grads(ref, [x], output_size=size)
            assert_close_grads(got, want, rtol=1e-6)
        with pytest.raises(ValueError, match='output size'):
            grads(q, [x], output_size=[20, 20])


@pytest.mark.parametrize('case', ['conv2d_stride_pad', 'convt1d'])
def test_unbatched_input(case):
    ref, q, x = make(case)
    with settings('L2', activation_compression_bits=[8]):
        got = grads(q, [x[0]])
    assert_close_grads(got, grads(ref, [x[0]]), rtol=2e-2)



def test_no_compression_when_autograd_needs_no_input(monkeypatch):
    calls = spy_quantize(monkeypatch)
    ref, q, x = make('conv2d_stride_pad')
    with settings('L3'):
        with torch.no_grad():
            assert torch.equal(q(x), ref(x))
        q.requires_grad_(False)  # frozen layer, input needs grad: only the weight is kept
        got = grads(q, [x])
        assert not calls
        assert q.actnn_saved_bytes == 0
        q.weight.requires_grad_(True)  # first layer: input needs no grad, weight does
        grads(q, [x.detach()])
        assert calls
    ref.requires_grad_(False)
    assert_close_grads(got, grads(ref, [x]), rtol=1e-6)


def test_saved_bytes_recorded_at_2_bits():
    _, q, x = make('conv2d_stride_pad')
    with settings('L3'):
        q(x.requires_grad_())
    assert q.actnn_full_bytes == x.nbytes
    assert q.actnn_full_bytes / q.actnn_saved_bytes > 5  # tiny tensor: per-sample overheads


def test_inplace_change_after_forward_is_harmless_when_compressed():
    ref, q, x = make('conv2d_stride_pad')
    want = grads(ref, [x])
    with settings('L2', activation_compression_bits=[8]):
        xin = x.clone().requires_grad_()
        act = xin * 1
        out = q(act)
        act.mul_(0)  # autograd would refuse this for a full-precision saved input
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
    assert_close_grads({'weight': q.weight.grad}, {'weight': want['weight']}, rtol=2e-2)


@pytest.mark.parametrize('batch', [8, 19, 64])
@pytest.mark.parametrize('dilation', [1, 2])
def test_forward_over_batch_slices_matches_torch(batch, dilation, monkeypatch):
    # an activation-heavy CPU convolution with a large output runs over slices of the batch
    # (less memory): the same values up to rounding (oneDNN may pick another kernel for a
    # smaller batch)
    monkeypatch.setattr(conv_module, '_SLICED_MIN_BYTES', 0)
    calls = []
    convolution = torch.ops.aten.convolution
    monkeypatch.setattr(torch.ops.aten, 'convolution',
                        lambda x, *a: calls.append(x.shape[0]) or convolution(x, *a))
    conv = nn.Conv2d(4, 6, 3, padding=dilation, dilation=dilation, stride=2)
    x = torch.randn(batch, 4, 13, 12)
    args = ([2, 2], [dilation] * 2, [dilation] * 2, False, [0, 0], 1)
    got = conv_module._convolution(x, conv.weight, conv.bias, args)
    assert sum(calls) == batch and len(calls) == len(range(0, batch, -(-batch // 8)))
    torch.testing.assert_close(got, convolution(x, conv.weight, conv.bias, *args),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('needs', ['input', 'weight', 'both'])
def test_channels_last_backward_matches_torch(needs):
    # an activation-heavy CPU convolution differentiates in channels_last (less memory)
    ref = nn.Conv2d(4, 6, 3, padding=1)
    q = copy.deepcopy(ref)
    q.__class__ = actnn_mm.QConv2d
    x = torch.randn(5, 4, 12, 12, requires_grad=needs != 'weight')
    loss_weight = torch.randn(5, 6, 12, 12)
    got = {}
    for name, module in (('want', ref), ('got', q)):
        module.requires_grad_(needs != 'input')
        with settings('L2', activation_compression_bits=[8]):
            (module(x) * loss_weight).sum().backward()
        got[name] = [t.grad for t in (x, ref.weight, ref.bias)] if name == 'want' else [
            t.grad for t in (x, q.weight, q.bias)]
        x.grad = None
    want, got = got['want'], got['got']
    assert [g is None for g in got] == [g is None for g in want]
    if needs != 'weight':  # the input gradient needs no activation: exact up to rounding
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    if needs != 'input':
        assert_close_grads({'weight': got[1], 'bias': got[2]},
                           {'weight': want[1], 'bias': want[2]}, rtol=3e-2)


def _as_q(module: nn.Conv2d) -> nn.Conv2d:
    """A QConv2d copy of ``module`` (the torch one stays)."""
    q = copy.deepcopy(module)
    q.__class__ = actnn_mm.QConv2d
    return q


@pytest.mark.parametrize('heavy_first', [True, False])
def test_readers_of_one_input_return_one_layout(heavy_first):
    # a light convolution (weights outweigh activations: NCHW backward) reading the same tensor as
    # a heavy one (channels_last backward) returns its input gradient channels_last too, so that
    # autograd sums the two in one layout; the values are torch's
    heavy, light = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 64, 7, stride=6)
    weights = {heavy: torch.randn(5, 6, 12, 12), light: torch.randn(5, 64, 2, 2)}

    def input_grad(modules, quantized):
        leaf = torch.randn(5, 4, 12, 12, generator=torch.Generator().manual_seed(0),
                           requires_grad=True)
        x = leaf * 1.0  # not a leaf: its hook sees the sum autograd made
        seen = []
        x.register_hook(seen.append)
        with settings('L2', activation_compression_bits=[8]):
            sum(((_as_q(m) if quantized else m)(x) * weights[m]).sum() for m in modules).backward()
        return seen[0]

    order = [heavy, light] if heavy_first else [light, heavy]
    got, want = input_grad(order, True), input_grad(order, False)
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # read by no heavy ActNN convolution, the light one keeps torch's layout
    assert input_grad([light], True).is_contiguous()
