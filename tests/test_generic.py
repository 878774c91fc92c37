"""Generic mode (saved-tensor hooks) and the report of uncompressed activations: gradients close
at 8 bits and unbiased at 2 bits for linear ops, what is skipped, sharing, memory on a ViT block."""
import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actnn_mm
from actnn_mm import generic
from test_layers.qchecks import assert_close_grads, assert_unbiased, grads, settings

pytestmark = pytest.mark.usefixtures('single_thread')


class Attention(nn.Module):
    """ViT attention written out: matmuls and softmax that no ActNN layer covers."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """A pre-norm ViT block."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class LinearOps(nn.Module):
    """Ops whose backward is linear in each saved tensor, none of them an ActNN layer's."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, x):
        y = F.interpolate(self.conv(x), scale_factor=2, mode='bilinear')
        return torch.matmul(self.a(y), self.b(y).transpose(-2, -1))


class Fn(nn.Module):
    """A function as a module (for ``grads``)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *inputs):
        return self.fn(*inputs)


def block(dim=32):
    torch.manual_seed(0)
    return Block(dim)


def generic_grads(model, x, **options):
    with actnn_mm.compress_saved_tensors(model, **options) as hooks:
        result = grads(model, [x])
    return result, hooks.stats


@pytest.fixture
def quantized(monkeypatch):
    """The tensors generic mode quantizes."""
    seen = []
    quantize = generic.quantize
    monkeypatch.setattr(generic, 'quantize', lambda t, *a, **k: seen.append(t) or quantize(t, *a,
                                                                                          **k))
    return seen


def test_8bit_close_on_a_transformer_block():
    model, x = block(), torch.randn(2, 16, 32)
    want = grads(model, [x])
    got, stats = generic_grads(model, x, bits=8, min_bytes=1024)
    assert_close_grads(got, want, rtol=2e-2)
    assert torch.equal(got['out'], want['out'])
    # the LayerNorms' inputs and statistics stay exact (plain normalization modules)
    assert stats.compressed >= 8 and stats.kept_bytes['norm'] >= 2 * x.nbytes


def test_8bit_close_on_multihead_attention():
    torch.manual_seed(0)
    model = nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(2, 16, 32)

    attend = Fn(lambda t: model(t, t, t)[0])
    attend.model = model
    want = grads(attend, [x])
    with actnn_mm.compress_saved_tensors(model, bits=8, min_bytes=1024) as hooks:
        got = grads(attend, [x])
    assert hooks.stats.compressed > 0
    assert_close_grads(got, want, rtol=3e-2)


def test_2bit_unbiased_for_linear_ops():
    torch.manual_seed(0)
    model, x = LinearOps(), torch.randn(2, 3, 8, 8)
    want = grads(model, [x])
    keys = ['input0', 'conv.weight', 'a.weight', 'b.weight']
    assert_unbiased(lambda: generic_grads(model, x, bits=2, min_bytes=0)[0], want, k=96,
                    keys=keys)
    stats = generic_grads(model, x, bits=2, min_bytes=0)[1]
    assert (stats.compressed, stats.shared) == (4, 1)  # x, y (twice), a, b^T
    assert stats.kept_bytes == {'rows': 2 * 4 * 16 * 16 * 4}  # the loss weights: no gradient


def test_parameters_small_and_integer_tensors_stay_uncompressed(quantized):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 10))
    x = torch.randn(4, 3, 8, 8)
    _, stats = generic_grads(model, x, bits=4, min_bytes=1024)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert quantized and all(t.nbytes >= 1024 for t in quantized)
    assert not any(t.untyped_storage().data_ptr() in params for t in quantized)
    assert stats.kept_bytes['type'] > 0  # max-pool indices
    assert stats.kept_bytes['small'] > 0  # the linear layer's input (4 x 128 floats)


def test_autocast_copies_of_weights_stay_uncompressed(quantized):
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    x = torch.randn(8, 64, requires_grad=True)
    with torch.autocast('cpu', torch.bfloat16), actnn_mm.compress_saved_tensors(min_bytes=0):
        model(x).float().sum().backward()
    assert [tuple(t.shape) for t in quantized] == [(8, 64)]
    assert x.grad is not None and model.weight.grad.dtype == torch.float32


def test_a_tensor_saved_by_several_ops_is_stored_once():
    x = torch.randn(4, 64, requires_grad=True)
    with actnn_mm.compress_saved_tensors(bits=8, min_bytes=0) as hooks:
        y = x.exp()  # exp keeps its output y; y * y keeps it twice more
        (y * y).sum().backward()
    assert (hooks.stats.compressed, hooks.stats.shared) == (1, 2)
    one = actnn_mm.compress.quantize(x, 8)
    assert hooks.stats.saved_bytes == one.nbytes and hooks.stats.full_bytes == x.nbytes
    want = 2 * x.detach().exp() ** 2
    assert (x.grad - want).norm() <= 1e-2 * want.norm()


def test_a_changed_tensor_is_compressed_again():
    x = torch.randn(4, 64, requires_grad=True)
    with actnn_mm.compress_saved_tensors(min_bytes=0) as hooks:
        y = x * 2
        z = y.sin()  # keeps y
        y.add_(1)
        w = y.cos()  # keeps the changed y
    assert (hooks.stats.compressed, hooks.stats.shared) == (2, 0)
    del z, w


def test_backward_outside_the_context_and_hooks_removed_after():
    model, x = block(), torch.randn(2, 16, 32)
    want = grads(model, [x])
    context = actnn_mm.compress_saved_tensors(model, bits=8, min_bytes=1024)
    with context:
        out = model(x.requires_grad_())
    compressed = context.stats.compressed
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
    assert (x.grad - want['input0']).norm() <= 2e-2 * want['input0'].norm()
    model(x).sum()
    assert context.stats.compressed == compressed
    with context:  # re-entered for the next step: fresh statistics
        assert context.stats.compressed == 0
        with pytest.raises(RuntimeError, match='already active'):
            context.__enter__()


def test_vit_block_at_2_bits_keeps_4x_less():
    """Converted layers and generic mode together, counted against what torch keeps."""
    model, x = block(64), torch.randn(4, 64, 64)
    plain = sum(r.nbytes for r in actnn_mm.report_uncompressed(model, x, min_bytes=0))
    with settings('L3', activation_compression_bits=[2], adaptive=False):
        actnn_mm.QModule(model)
        _, stats = generic_grads(model, x)
    layers = [m for m in model.modules() if hasattr(m, 'actnn_saved_bytes')]
    assert len(layers) == 7  # 2 LayerNorm, 4 Linear, GELU
    kept = sum(m.actnn_saved_bytes for m in layers) + stats.saved_bytes + sum(
        stats.kept_bytes.values())
    # q, k^T, the softmax output (read again by attn @ v), v; the loss weights are 'rows'
    assert (stats.compressed, stats.shared) == (4, 1)
    assert plain / kept >= 4
    assert stats.ratio > 10
    step = actnn_mm.stats(model)  # the layers' and generic mode's bytes in one place
    assert step['generic']['calls'] == 4 and step['generic']['bits_mean'] == 2
    assert (step['generic']['bytes'], step['generic']['full_bytes']) == (stats.saved_bytes,
                                                                         stats.full_bytes)
    assert step['generic']['uncompressed_bytes'] == stats.kept_bytes
    assert step['compressed_bytes'] == sum(m.actnn_saved_bytes for m in layers) + stats.saved_bytes
    assert step['average_bits'] == 2
    with settings('L3', activation_compression_bits=[2], adaptive=False):
        generic_grads(model, x)  # the next step starts afresh
    assert actnn_mm.stats(model)['compressed_bytes'] == step['compressed_bytes']


def test_8bit_close_with_converted_layers():
    model, x = block(), torch.randn(2, 16, 32)
    want = grads(model, [x])
    with settings('L2', activation_compression_bits=[8]):
        actnn_mm.QModule(model)
        got, _ = generic_grads(model, x, min_bytes=0)
    assert_close_grads(got, want, rtol=3e-2)


def test_bad_options_raise():
    with pytest.raises(ValueError, match='bits must be one of'):
        actnn_mm.compress_saved_tensors(bits=3)
    with pytest.raises(ValueError, match='min_bytes'):
        actnn_mm.compress_saved_tensors(min_bytes=-1)
    with pytest.raises(ValueError, match='min_row_numel'):
        actnn_mm.compress_saved_tensors(min_row_numel=1.5)


def test_report_names_modules_keeping_full_precision(caplog):
    model, x = block(), torch.randn(2, 16, 32)
    with caplog.at_level(logging.INFO, logger='actnn_mm'):
        before = actnn_mm.report_uncompressed(model, x, min_bytes=1024)
        with settings('L3'):
            actnn_mm.QModule(model)
        after = actnn_mm.report_uncompressed(model, x, min_bytes=1024)
    assert {r.module for r in before} == {'norm1', 'attn', 'attn.qkv', 'attn.proj', 'norm2',
                                          'mlp.0', 'mlp.1', 'mlp.2'}
    assert [(r.module, r.type) for r in after] == [('attn', 'Attention')]
    assert after[0].tensors == 4 and after[0].nbytes == 3 * 2 * 4 * 16 * 8 * 4 + 2 * 4 * 16 * 16 * 4
    assert 'attn (Attention): ' in caplog.text


def test_qmodule_reports_the_first_training_step_once(caplog):
    model, x = block(64), torch.randn(8, 128, 64)  # attention probabilities: 2 MiB
    with settings('L3'), caplog.at_level(logging.INFO, logger='actnn_mm'):
        actnn_mm.QModule(model)
        with torch.no_grad():
            model(x)  # no gradients: not a training step, nothing reported yet
        assert 'full-precision activations' not in caplog.text
        model(x).sum().backward()
        assert 'modules keeping full-precision activations' in caplog.text
        assert 'attn (Attention): 2.75 MiB in 4 tensors' in caplog.text  # probabilities, q, k, v
        caplog.clear()
        model(x).sum().backward()
    assert 'full-precision' not in caplog.text


def test_first_step_report_stays_silent_under_generic_mode(caplog):
    model, x = block(64), torch.randn(8, 128, 64)
    with settings('L3'), caplog.at_level(logging.INFO, logger='actnn_mm'):
        actnn_mm.QModule(model)
        generic_grads(model, x)
        model(x).sum().backward()  # the observer is gone, generic mode or not
    assert 'full-precision' not in caplog.text


def test_report_leaves_buffers_and_random_state_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Dropout(0.5))
    x = torch.randn(2, 3, 8, 8)
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    report = actnn_mm.report_uncompressed(model, x, min_bytes=0)
    assert {r.module for r in report} == {'0', '1', '2'}
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_plain_normalization_layers_keep_their_input():
    """A norm layer's backward normalizes its saved input with the exact statistics: rounding
    it would be amplified by 1/std (here 2 values per channel). Generic mode leaves what is saved
    inside plain normalization modules alone ('norm'); gradients stay exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 512, 1), nn.BatchNorm2d(512), nn.Conv2d(512, 4, 1))
    x = torch.randn(2, 8, 1, 1)
    want = grads(model, [x])
    got, stats = generic_grads(model, x, bits=2, min_bytes=1024)
    assert stats.kept_bytes['norm'] >= 2 * 512 * 4 and stats.compressed == 1  # conv 2's input
    del got['2.weight'], want['2.weight']  # the only gradient reading a compressed tensor
    assert_close_grads(got, want, rtol=1e-5)


class FooLoss(nn.Module):
    """An OpenMMLab-style loss: a plain module named '...Loss' (an L1 loss: abs keeps the
    difference, its backward takes the sign)."""

    def forward(self, pred, target):
        return (pred - target).abs().mean()


class Criterion(nn.CrossEntropyLoss):
    """A torch loss under a name without 'Loss' (recognised as a subclass of ``_Loss``)."""


class Head(nn.Module):
    """A dense head with a classification and a regression loss."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.loss_cls = Criterion()
        self.loss_bbox = FooLoss()

    def forward(self, x, labels, targets):
        y = self.conv(x)
        return self.loss_cls(y, labels) + self.loss_bbox(y, targets)


def test_loss_modules_quantize_at_8_bits(monkeypatch):
    """Backward exponentiates the log-probabilities a cross-entropy keeps and takes the sign of
    an L1 loss's difference: what is saved inside loss modules is quantized at 8 bits, the rest
    at the configured 2."""
    widths = []
    quantize = generic.quantize
    monkeypatch.setattr(generic, 'quantize',
                        lambda t, bits, *a, **k: widths.append(bits) or quantize(t, bits, *a, **k))
    torch.manual_seed(0)
    model, x = Head(), torch.randn(2, 3, 16, 16)
    labels, targets = torch.randint(8, (2, 16, 16)), torch.randn(2, 8, 16, 16)
    want = grads(model, [x], labels=labels, targets=targets, loss_weight=torch.tensor(1.0))
    with actnn_mm.compress_saved_tensors(model, bits=2, min_bytes=0, min_row_numel=0) as hooks:
        got = grads(model, [x], labels=labels, targets=targets, loss_weight=torch.tensor(1.0))
    # the conv's input at 2 bits; the log-probabilities (kept by log_softmax, shared with
    # nll_loss) and the difference at 8; the labels are integers
    assert sorted(widths) == [2, 8, 8] and hooks.stats.shared == 1
    assert hooks.stats.kept_bytes == {'type': labels.nbytes, 'shape': 8}
    del got['conv.weight'], want['conv.weight']  # from the 2-bit input
    assert_close_grads(got, want, rtol=5e-2)  # the exponentiated rounding: noise, not bias
    assert not torch.equal(got['input0'], want['input0'])


def test_relu_output_kept_as_an_exact_mask(quantized):
    """F.relu's backward reads only where its output is positive: kept as a 1-bit mask (the
    relu's own save), while a later op saving the same output quantizes it as usual."""
    torch.manual_seed(0)
    x = torch.randn(4, 64, 64, requires_grad=True)
    w = nn.Parameter(torch.randn(64, 64))  # matmul saves relu's output for w's gradient
    def f(x):
        return (F.relu(x * 2) @ w).sum()
    f(x).backward()
    want = x.grad.clone()
    x.grad = w.grad = None
    with actnn_mm.compress_saved_tensors(bits=2, min_bytes=0) as hooks:
        loss = f(x)
    loss.backward()
    # x * 2 saves nothing (a constant factor); relu's output: mask; matmul's copy: quantized
    assert len(quantized) == 1 and hooks.stats.compressed == 2
    mask_bytes = x.numel() // 8
    quantized_bytes = actnn_mm.compress.quantize(quantized[0], 2).nbytes
    assert hooks.stats.saved_bytes == quantized_bytes + mask_bytes
    assert torch.equal(x.grad, want)  # matmul's copy of relu's output only feeds w's gradient


def test_tensors_without_gradient_and_short_rows_stay_exact(quantized):
    """Statistics (attention's log-sum-exp, F.layer_norm's mean and rstd) and per-box data have
    few values per sample and no gradient ('rows'); activations with short rows (tokens, heads
    folded into dim 0) are compressed."""
    torch.manual_seed(0)
    x = torch.randn(4, 16, 1024, requires_grad=True)
    stat, data = torch.randn(4, 16, 1), torch.randn(4, 16, 1024)  # 16 and 16384 values a row
    with actnn_mm.compress_saved_tensors(bits=2, min_bytes=0) as hooks:
        exact = x * stat  # keeps stat
        x * data  # keeps data
        x.view(64, 1024).sin()  # keeps x as 64 rows of 1024 values
    assert [t.shape for t in quantized] == [data.shape, (64, 1024)]
    assert hooks.stats.kept_bytes == {'rows': stat.nbytes}
    exact.sum().backward()
    assert torch.equal(x.grad, stat.expand_as(x))


class WeightedLoss(nn.Module):
    """Per-anchor classification and box terms, weighted by data without gradient."""

    def forward(self, scores, boxes, weights):
        return (scores.sigmoid() * weights).sum() + boxes.abs().sum()


def test_loss_rules_by_gradient_and_row_length(monkeypatch):
    """Inside a loss: what requires grad at 8 bits, targets and weights (read linearly) at the
    configured bits however short their rows; rows of a few values (boxes) stay exact."""
    widths = []
    quantize = generic.quantize
    monkeypatch.setattr(generic, 'quantize',
                        lambda t, bits, *a, **k: widths.append((tuple(t.shape), bits))
                        or quantize(t, bits, *a, **k))
    loss = WeightedLoss()
    scores = torch.randn(512, 80, requires_grad=True)
    boxes = torch.randn(512, 4, requires_grad=True)
    weights = torch.rand(512, 80)
    with actnn_mm.compress_saved_tensors(loss, bits=2, min_bytes=0) as hooks:
        loss(scores, boxes, weights).backward()
    assert sorted(widths) == [((512, 80), 2), ((512, 80), 8)]  # weights; sigmoid's output
    assert hooks.stats.kept_bytes == {'rows': boxes.nbytes}  # abs keeps its (512, 4) input
    assert torch.equal(boxes.grad, boxes.detach().sign())
