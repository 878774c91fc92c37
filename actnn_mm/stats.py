"""What the last training step kept for backward: bits and bytes per layer (``actnn_mm.stats``).

The layers report every tensor they keep to :data:`step_log`, generic mode
(:class:`actnn_mm.compress_saved_tensors`) what it compressed and what it left in full precision;
a new training step starts when something is kept after a backward pass has run (no hook on the
model is needed).
"""
import collections
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
        self.begin_step()

    def begin_step(self) -> None:
        self.kept: Dict[int, List[_Kept]] = {}
        self.generic: List[_Kept] = []
        self.uncompressed: collections.Counter[str] = collections.Counter()

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

    def record_generic(self, nbytes: int, full_bytes: int, widths: Sequence[int],
                       sample_elements: int) -> None:
        """Note a saved tensor that generic mode compressed, arguments as in :meth:`record`."""
        self.generic.append(_Kept(nbytes, full_bytes, list(widths), sample_elements))

    def record_uncompressed(self, reason: str, nbytes: int) -> None:
        """Note a saved tensor of ``nbytes`` that generic mode left in full precision."""
        self.uncompressed[reason] += nbytes


step_log = StepLog()


def _summary(kept: List[_Kept]) -> Dict:
    """calls, bytes, full_bytes and, for quantized activations, the bits (mean weighted by
    elements, min, max) and the element-weighted bit sum and element count behind the mean."""
    entry = {'calls': len(kept), 'bytes': sum(k.nbytes for k in kept),
             'full_bytes': sum(k.full_bytes for k in kept)}
    widths = [(w, k.sample_elements) for k in kept if k.widths for w in k.widths]
    if widths:
        elements = sum(e for _, e in widths)
        bit_sum = sum(w * e for w, e in widths)
        entry.update(bits_mean=bit_sum / max(elements, 1), bits_min=min(w for w, _ in widths),
                     bits_max=max(w for w, _ in widths), bit_sum=bit_sum, elements=elements)
    return entry


def stats(model: torch.nn.Module) -> Dict:
    """What ``model`` kept for backward in the last (or current) training step.

    Args:
        model: a converted model (or any module containing ActNN layers), possibly trained under
            generic mode.

    Returns:
        A dict with ``average_bits`` (element-weighted over the activations the layers and
        generic mode quantized at the configured or allocated bits; None if none; masks,
        indices and generic mode's 8-bit loss tensors count in the bytes only),
        ``compressed_bytes`` (all the layers and generic mode kept compressed: quantized
        activations, masks, indices),
        ``full_precision_bytes`` (what torch would have kept instead), ``ratio`` (their
        quotient), ``layers``: per module name, its ``type``, ``calls``, ``bytes``,
        ``full_bytes`` and, for quantized activations, ``bits_mean``, ``bits_min``,
        ``bits_max``; and ``generic``: the same figures for the tensors generic mode compressed
        (``calls`` = their number) plus ``uncompressed_bytes``, the bytes of saved tensors it
        left in full precision by reason ('type', 'shape', 'small'), parameters excluded.
    """
    layers = {}
    for name, module in model.named_modules():
        kept = step_log.kept.get(id(module))
        if kept:
            layers[name] = {'type': type(module).__name__, **_summary(kept)}
    generic = {**_summary(step_log.generic), 'uncompressed_bytes': dict(step_log.uncompressed)}
    entries = [*layers.values(), generic]
    bit_sum = sum(e.pop('bit_sum', 0) for e in entries)
    elements = sum(e.pop('elements', 0) for e in entries)
    nbytes = sum(e['bytes'] for e in entries)
    full = sum(e['full_bytes'] for e in entries)
    return {'average_bits': bit_sum / elements if elements else None, 'compressed_bytes': nbytes,
            'full_precision_bytes': full, 'ratio': full / nbytes if nbytes else None,
            'layers': layers, 'generic': generic}
