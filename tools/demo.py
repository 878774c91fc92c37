"""A short demonstration of the activation codec on a ResNet-like activation.

Prints, per bit width: the compression against float32, the worst error in units of the group
step, and how the mean of many stochastically rounded copies approaches the input (unbiasedness).
"""
import torch

from actnn_mm.compress import dequantize, extension_loaded, quantize


def main() -> None:
    torch.manual_seed(0)
    # A post-ReLU conv activation: batch 8, 64 channels, 56x56, channels with different scales.
    x = torch.relu(torch.randn(8, 64, 56, 56) * torch.rand(1, 64, 1, 1) * 3)
    print(f'activation {tuple(x.shape)} float32: {x.numel() * 4 / 2**20:.1f} MiB; '
          f'compiled kernels: {extension_loaded()}')
    print(f"{'bits':>4} {'MiB':>7} {'ratio':>7} {'max |err|':>10} {'mean err, 1 copy':>17} "
          f"{'mean err, mean of 64':>21}")
    for bits in (1, 2, 4, 8):
        c = quantize(x, bits)
        one = (dequantize(c) - x).abs().mean()
        mean = torch.stack([dequantize(quantize(x, bits)) for _ in range(64)]).mean(0)
        print(f'{bits:>4} {c.nbytes / 2**20:>7.2f} {x.numel() * 4 / c.nbytes:>6.1f}x '
              f'{(dequantize(c) - x).abs().max():>10.4f} {one:>17.5f} '
              f'{(mean - x).abs().mean():>21.5f}')
    mixed = torch.tensor([1, 2, 2, 2, 2, 2, 4, 1])
    c = quantize(x, mixed)
    print(f'mixed precision {mixed.tolist()} (average {mixed.float().mean():.2f} bits): '
          f'{x.numel() * 4 / c.nbytes:.1f}x')


if __name__ == '__main__':
    main()
