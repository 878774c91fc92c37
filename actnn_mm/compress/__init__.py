"""Activation codec: per-group, stochastically rounded, mixed-precision quantization."""
from .codec import FLOAT_DTYPES, SUPPORTED_BITS, CompressedTensor, dequantize, quantize
from .ops import extension_loaded

__all__ = ['CompressedTensor', 'quantize', 'dequantize', 'extension_loaded', 'SUPPORTED_BITS',
           'FLOAT_DTYPES']
