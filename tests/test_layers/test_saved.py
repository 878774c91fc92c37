"""How layers keep activations: bit packing, sharing one compressed copy, byte accounting,
swap (L4) and the full-precision fallbacks."""
import pytest
import torch

import actnn_mm
from actnn_mm.layers import held_bytes
from actnn_mm.layers.packed import pack_ints, unpack_ints
from actnn_mm.layers.saved import masked, save_packed
from qchecks import assert_close_grads, grads, settings


@pytest.mark.parametrize('bits', [1, 2, 4, 8])
@pytest.mark.parametrize('layout', ['contiguous', 'channels_last', 'transposed', 'odd', 'empty'])
def test_pack_ints_round_trip(bits, layout):
    gen = torch.Generator().manual_seed(0)
    shape = {'contiguous': (2, 3, 4, 5), 'channels_last': (2, 3, 4, 5), 'transposed': (7, 9),
             'odd': (3, 1, 13), 'empty': (0, 4)}[layout]
    t = torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.uint8)
    if layout == 'channels_last':
        t = t.to(memory_format=torch.channels_last)
    if layout == 'transposed':
        t = t.t()
    packed = pack_ints(t, bits)
    assert packed.nbytes == -(-t.numel() * bits // 8)
    restored = unpack_ints(packed)
    assert torch.equal(restored, t) and restored.stride() == t.stride()
    mask = t.bool()
    assert torch.equal(unpack_ints(pack_ints(mask, 1)), mask)


@pytest.mark.parametrize('mask_layout', ['contiguous', 'channels_last', 'transposed'])
@pytest.mark.parametrize('grad_layout', ['contiguous', 'channels_last', 'permuted', 'expanded'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float64])
def test_masked_in_any_pair_of_layouts(mask_layout, grad_layout, dtype):
    gen = torch.Generator().manual_seed(0)
    keep = torch.rand(2, 3, 4, 5, generator=gen) < 0.5
    grad = torch.randn(2, 3, 4, 5, generator=gen).to(dtype)
    if mask_layout == 'channels_last':
        keep = keep.to(memory_format=torch.channels_last)
    if mask_layout == 'transposed':
        keep, grad = keep.transpose(1, 3), grad.transpose(1, 3)
    if grad_layout == 'channels_last' and grad.dim() == 4 and mask_layout != 'transposed':
        grad = grad.to(memory_format=torch.channels_last)
    if grad_layout == 'permuted':  # dense, in an order no kernel reads across from the mask's
        grad = grad.transpose(1, 2).contiguous().transpose(1, 2)
    if grad_layout == 'expanded':  # e.g. the gradient of a sum: not dense
        grad = grad[:1].expand(grad.shape)
    stored = save_packed(keep, 1, torch.nn.ReLU(), keep.nbytes)
    out = masked(stored, grad, 2.0)
    assert out.shape == grad.shape and torch.equal(out, torch.where(keep, grad * 2, 0))
    assert not out._is_view()  # see test_input_gradients_are_summed_in_place


class _Tap(torch.autograd.Function):
    """Identity noting the address of the gradient flowing through it."""

    @staticmethod
    def forward(ctx, x, name, seen):
        ctx.name, ctx.seen = name, seen
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.seen[ctx.name] = grad.data_ptr()
        return grad, None, None


@pytest.mark.parametrize('layer,layout', [
    ('relu', torch.contiguous_format), ('relu', torch.channels_last),
    ('batch_norm', torch.contiguous_format), ('batch_norm', torch.channels_last),
    ('linear', torch.contiguous_format)])
def test_input_gradients_are_summed_in_place(layer, layout):
    # a tensor read by two layers gets two gradients; autograd sums them into one of the two
    # only if nothing else holds its memory (a view's base would)
    torch.manual_seed(0)
    make = {'relu': actnn_mm.QReLU, 'batch_norm': lambda: actnn_mm.QBatchNorm2d(8),
            'linear': lambda: actnn_mm.QLinear(6, 6)}[layer]
    x = torch.randn(4, 8, 6, 6).to(memory_format=layout).requires_grad_()
    seen = {}
    with settings('L2'):
        y = _Tap.apply(x, 'sum', seen)
        out = make()(_Tap.apply(y, 'first', seen)) + make()(_Tap.apply(y, 'second', seen))
        (out * torch.randn_like(out)).sum().backward()
    assert seen['sum'] in (seen['first'], seen['second'])


def two_convs(converted=True):
    torch.manual_seed(0)
    convs = torch.nn.ModuleList([torch.nn.Conv2d(4, 4, 3), torch.nn.Conv2d(4, 4, 1)])
    return actnn_mm.convert(convs)[0] if converted else convs


def test_one_activation_read_by_two_layers_is_compressed_once():
    convs = two_convs()
    x = torch.randn(2, 4, 6, 6)
    with settings('L3'):
        start = held_bytes()
        out = [conv(x.requires_grad_()) for conv in convs]
        assert convs[0].actnn_saved_bytes > 0 and convs[1].actnn_saved_bytes == 0
        assert held_bytes() - start == convs[0].actnn_saved_bytes
        sum(o.sum() for o in out).backward()
    assert held_bytes() == start


def test_changed_activation_is_compressed_again():
    convs = two_convs()
    ref = two_convs(converted=False)
    x = torch.randn(2, 4, 6, 6)
    with settings('L2', activation_compression_bits=[8]):
        act = x.clone().requires_grad_()
        y = act * 1
        first = convs[0](y)
        y.mul_(2)
        second = convs[1](y)
        assert convs[1].actnn_saved_bytes > 0
        (first.sum() + second.sum()).backward()
    y = x * 1
    first = ref[0](y)
    (first.sum() + ref[1](y * 2).sum()).backward()
    for conv, want in zip(convs, ref):
        assert_close_grads({'w': conv.weight.grad}, {'w': want.weight.grad}, rtol=2e-2)


def test_held_bytes_released_without_backward():
    convs = two_convs()
    with settings('L3'):
        start = held_bytes()
        out = convs[0](torch.randn(2, 4, 6, 6, requires_grad=True))
        assert held_bytes() > start
        del out
    assert held_bytes() == start


def test_float64_is_kept_in_full_precision():
    conv = two_convs()[0].double()
    ref = two_convs(converted=False)[0].double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with settings('L3'):
        got = grads(conv, [x])
    assert conv.actnn_saved_bytes == conv.actnn_full_bytes == x.nbytes
    assert_close_grads(got, grads(ref, [x]), rtol=1e-12)


def test_swap_is_a_no_op_on_cpu():
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    conv = two_convs()[0]
    start = held_bytes()
    with settings('L4'):
        swapped = conv(x)
        at_l4 = held_bytes() - start
    with settings('L3'):
        kept = conv(x * 1)
        assert held_bytes() - start == 2 * at_l4 > 0
    (swapped.sum() + kept.sum()).backward()
    assert held_bytes() == start
