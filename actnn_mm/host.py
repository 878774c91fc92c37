"""Device values read on the host without making the host wait for the device.

A training step on a GPU must not read GPU memory (``.item()``, ``.tolist()``, ``.cpu()``): each
read waits for every kernel queued before it. What the host needs from a step (the allocator's
sensitivities, NaN/Inf flags) is instead copied to pinned memory asynchronously and used once it
has arrived, typically at the next step boundary.
"""
from typing import Optional

import torch
from torch._subclasses.fake_tensor import is_fake


class HostCopy:
    """The values of a tensor on the host, copied without waiting for its device.

    On the CPU the tensor itself; on CUDA a pinned copy made behind the kernels queued so far,
    :meth:`ready` once they have run; tensors without values (fake or meta, e.g. while tracing)
    have none to copy (:attr:`has_values` is False).

    Args:
        t: the tensor (not changed afterwards by the caller).
    """

    def __init__(self, t: torch.Tensor) -> None:
        self._values: Optional[torch.Tensor] = None
        self._event: Optional[torch.cuda.Event] = None
        self.has_values = not (t.device.type == 'meta' or is_fake(t))
        if not self.has_values:
            return
        if t.device.type == 'cpu':
            self._values = t
        elif t.device.type == 'cuda':
            self._values = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._values.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:  # devices without events: a plain (waiting) copy
            self._values = t.cpu()

    def ready(self) -> bool:
        """Whether :meth:`values` can be read without waiting."""
        return self._values is not None and (self._event is None or self._event.query())

    def values(self) -> Optional[torch.Tensor]:
        """The values on the CPU, waiting for the copy if needed (None without
        :attr:`has_values`)."""
        if self._event is not None:
            self._event.synchronize()
        return self._values
