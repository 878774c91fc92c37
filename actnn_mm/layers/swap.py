"""L4: what the layers keep of a CUDA tensor waits in pinned CPU memory until backward.

The copy to the host runs on a side stream, so it overlaps the kernels that follow on the compute
stream (the compressed copy's GPU memory is released once the copy has run); the copy back is
queued on the same stream when backward needs the values, and the compute stream waits for it.
"""
from typing import Tuple, Union

import torch

from ..compress import CompressedTensor
from .packed import PackedInts

# What a layer keeps: an exact tensor, a quantized activation or packed small integers.
Kept = Union[torch.Tensor, CompressedTensor, PackedInts]


def _tensors(value: Kept) -> Tuple[torch.Tensor, ...]:
    if isinstance(value, CompressedTensor):
        return value.data, value.meta, value.sample_meta, value.bits, value.offsets
    if isinstance(value, PackedInts):
        return (value.data,)
    return (value,)


def offload(value: Kept, stream: torch.cuda.Stream) -> Kept:
    """``value`` (on a CUDA device) copied to pinned CPU memory on ``stream``, behind the work
    queued so far on the current stream."""
    stream.wait_stream(torch.cuda.current_stream(value.device))
    with torch.cuda.stream(stream):
        host = value.to('cpu', non_blocking=True)  # into pinned memory
    for t in _tensors(value):
        t.record_stream(stream)  # not reused by the compute stream before the copy has run
    return host


def bring_back(host: Kept, device: torch.device, stream: torch.cuda.Stream) -> Kept:
    """``host`` (what :func:`offload` made) on ``device`` again, copied on ``stream``; the
    current stream waits for the copy."""
    with torch.cuda.stream(stream):
        value = host.to(device, non_blocking=True)
    current = torch.cuda.current_stream(device)
    current.wait_stream(stream)
    for t in _tensors(value):
        t.record_stream(current)  # made on the side stream, read and freed on this one
    return value
