"""What the last training step kept for backward: bits and bytes per layer (``actnn_mm.stats``).

The layers report every tensor they keep to :data:`step_log`; a new training step starts when a
layer keeps something after a backward pass has run (no hook on the model is needed).
"""
import dataclasses
from typing import Dict, List, Optional, Sequence

import torch


@dataclasses.dataclass
class _Kept:
    nbytes: int
    full_bytes: int
    widths: Optional[List[int]]  # bits per sample of a quantized activation, else None
    sample_elements: int


class StepLog:
    """Everything the layers kept since the current training step began."""

    def __init__(self) -> None:
        self.kept: Dict[int, List[_Kept]] = {}

    def begin_step(self) -> None:
        self.kept = {}

    def record(self, module: torch.nn.Module, nbytes: int, full_bytes: int,
               widths: Optional[Sequence[int]] = None, sample_elements: int = 0) -> None:
        """Note that ``module`` keeps ``nbytes`` where torch would keep ``full_bytes``.

        Args:
            module: the layer.
            nbytes: bytes kept.
            full_bytes: bytes torch would keep for the same purpose.
            widths: bits per sample when the tensor kept is a quantized activation.
            sample_elements: elements per sample of that activation.
        """
        self.kept.setdefault(id(module), []).append(
            _Kept(nbytes, full_bytes, None if widths is None else list(widths), sample_elements))


step_log = StepLog()


def stats(model: torch.nn.Module) -> Dict:
    """What the layers of ``model`` kept for backward in the last (or current) training step.

    Args:
        model: a converted model (or any module containing ActNN layers).

    Returns:
        A dict with ``average_bits`` (element-weighted over the quantized activations; None if
        none), ``compressed_bytes`` (all the layers kept: quantized activations, masks, indices),
        ``full_precision_bytes`` (what torch would have kept instead), ``ratio`` (their quotient)
        and ``layers``: per module name, its ``type``, ``calls``, ``bytes``, ``full_bytes`` and,
        for quantized activations, ``bits_mean``, ``bits_min``, ``bits_max``.
    """
    layers = {}
    bit_sum = elements = nbytes = full = 0
    for name, module in model.named_modules():
        kept = step_log.kept.get(id(module))
        if not kept:
            continue
        entry = {'type': type(module).__name__, 'calls': len(kept),
                 'bytes': sum(k.nbytes for k in kept), 'full_bytes': sum(k.full_bytes for k in kept)}
        widths = [(w, k.sample_elements) for k in kept if k.widths for w in k.widths]
        if widths:
            layer_elements = sum(e for _, e in widths)
            layer_bits = sum(w * e for w, e in widths)
            entry.update(bits_mean=layer_bits / max(layer_elements, 1),
                         bits_min=min(w for w, _ in widths), bits_max=max(w for w, _ in widths))
            bit_sum += layer_bits
            elements += layer_elements
        nbytes += entry['bytes']
        full += entry['full_bytes']
        layers[name] = entry
    return {'average_bits': bit_sum / elements if elements else None, 'compressed_bytes': nbytes,
            'full_precision_bytes': full, 'ratio': full / nbytes if nbytes else None,
            'layers': layers}
