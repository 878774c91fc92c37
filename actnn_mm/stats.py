"""What a model kept for backward in its last training step: bits and bytes per layer.

A step begins when the model's layers keep something after its backward ran (see
:mod:`actnn_mm.layers.state`); no hook on the model is needed.
"""
import collections
from typing import Dict, List

import torch

from .layers.state import states_in
from .steplog import _Kept


def _summary(kept: List[_Kept], widths: Dict[int, List[int]]) -> Dict:
    """calls, bytes, full_bytes and, for quantized activations (their ``widths`` by id), the
    bits (mean weighted by elements, min, max) and the element-weighted bit sum and element count
    behind the mean."""
    entry = {'calls': len(kept), 'bytes': sum(k.nbytes for k in kept),
             'full_bytes': sum(k.full_bytes for k in kept)}
    pairs = [(w, k.sample_elements) for k in kept if k.widths is not None
             for w in widths[id(k)]]
    if pairs:
        elements = sum(e for _, e in pairs)
        bit_sum = sum(w * e for w, e in pairs)
        entry.update(bits_mean=bit_sum / max(elements, 1), bits_min=min(w for w, _ in pairs),
                     bits_max=max(w for w, _ in pairs), bit_sum=bit_sum, elements=elements,
                     statistics_bit_sum=8 * sum(k.statistics_bytes for k in kept))
    return entry


def _read_widths(kept: List[_Kept]) -> Dict[int, List[int]]:
    """The widths of the quantized activations in ``kept`` by id, read from their device at
    once."""
    quantized = [k for k in kept if k.widths is not None]
    if not quantized:
        return {}
    device = quantized[0].widths.device
    values = torch.cat([k.widths.to(device) for k in quantized]).tolist()
    widths, start = {}, 0
    for k in quantized:
        widths[id(k)] = values[start:start + k.widths.numel()]
        start += k.widths.numel()
    return widths


def stats(model: torch.nn.Module) -> Dict:
    """What ``model`` kept for backward in the last (or current) training step.

    Reads the bit widths chosen on a device in one go (the only read of device memory).

    Args:
        model: a converted model (or any module containing ActNN layers), possibly trained under
            generic mode.

    Returns:
        A dict with ``average_bits`` (element-weighted over the activations the layers and
        generic mode quantized at the configured or allocated bits; None if none; masks,
        indices and generic mode's 8-bit loss tensors count in the bytes only),
        ``statistics_bits`` (what their group statistics cost per value: at L3-L5
        ``average_bits + statistics_bits`` is the budget),
        ``compressed_bytes`` (all the layers and generic mode kept compressed: quantized
        activations, masks, indices),
        ``full_precision_bytes`` (what torch would have kept instead), ``ratio`` (their
        quotient), ``layers``: per module name, its ``type``, ``calls``, ``bytes``,
        ``full_bytes`` and, for quantized activations, ``bits_mean``, ``bits_min``,
        ``bits_max``; and ``generic``: the same figures for the tensors generic mode compressed
        (``calls`` = their number) plus ``uncompressed_bytes``, the bytes of saved tensors it
        left in full precision by reason ('type', 'shape', 'small'), parameters excluded.
    """
    logs = [state.step_log for state in states_in(model).values()]
    kept = {name: (module, [k for log in logs for k in log.kept.get(id(module), ())])
            for name, module in model.named_modules()}
    kept = {name: entry for name, entry in kept.items() if entry[1]}
    generic_kept = [k for log in logs for k in log.generic]
    widths = _read_widths([k for _, ks in kept.values() for k in ks] + generic_kept)
    layers = {name: {'type': type(module).__name__, **_summary(ks, widths)}
              for name, (module, ks) in kept.items()}
    uncompressed = collections.Counter()
    for log in logs:
        uncompressed.update(log.uncompressed)
    generic = {**_summary(generic_kept, widths), 'uncompressed_bytes': dict(uncompressed)}
    entries = [*layers.values(), generic]
    bit_sum = sum(e.pop('bit_sum', 0) for e in entries)
    statistics = sum(e.pop('statistics_bit_sum', 0) for e in entries)
    elements = sum(e.pop('elements', 0) for e in entries)
    nbytes = sum(e['bytes'] for e in entries)
    full = sum(e['full_bytes'] for e in entries)
    return {'average_bits': bit_sum / elements if elements else None,
            'statistics_bits': statistics / elements if elements else None,
            'compressed_bytes': nbytes,
            'full_precision_bytes': full, 'ratio': full / nbytes if nbytes else None,
            'layers': layers, 'generic': generic}
