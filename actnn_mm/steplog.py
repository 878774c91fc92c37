"""What a training step kept for backward, as the layers report it (read by :func:`actnn_mm.stats`).

The layers of a model report every tensor they keep to its :class:`StepLog`, generic mode
(:class:`actnn_mm.compress_saved_tensors`) what it compressed and what it left in full precision.
Bit widths chosen on a device stay there until someone asks, and the NaN/Inf flags of activations
quantized on an accelerator are read once they reach the host, at a later step boundary (see
:meth:`StepLog.watch`), so that recording never waits for the device.
"""
import collections
import dataclasses
from typing import Dict, List, Optional, Tuple

import torch

from .host import HostCopy


@dataclasses.dataclass
class _Kept:
    nbytes: int
    full_bytes: int
    widths: Optional[torch.Tensor]  # bits per sample of a quantized activation, else None
    sample_elements: int
    statistics_bytes: int = 0  # of a quantized activation's group statistics


class StepLog:
    """Everything the layers kept since the current training step began."""

    def __init__(self) -> None:
        # NaN/Inf flags of earlier steps on their way to the host, with what each flag is of
        self._arriving: List[Tuple[HostCopy, List[str]]] = []
        self.flags: List[torch.Tensor] = []
        self.begin_step()

    def begin_step(self) -> None:
        """Start a new step, raising first if an earlier step's activations were not finite."""
        copy = HostCopy(torch.stack(self.flags)) if self.flags else None
        if copy is not None and copy.has_values:
            self._arriving.append((copy, self.flagged))
        self.kept: Dict[int, List[_Kept]] = {}
        self.generic: List[_Kept] = []
        self.uncompressed: collections.Counter[str] = collections.Counter()
        self.flags: List[torch.Tensor] = []
        self.flagged: List[str] = []
        self.check_arrived()

    def watch(self, not_finite: torch.Tensor, what: str) -> None:
        """Check a device bool scalar (whether an activation quantized on an accelerator held
        NaN or Inf) once it reaches the host, at a later step boundary."""
        self.flags.append(not_finite)
        self.flagged.append(what)

    def check_arrived(self, wait: bool = False) -> None:
        """Raise if a flag of :meth:`watch` that reached the host (or all, with ``wait``) is set.

        Raises:
            ValueError: naming the first activation that held NaN or Inf.
        """
        while self._arriving and (wait or self._arriving[0][0].ready()):
            copy, flagged = self._arriving.pop(0)
            values = copy.values()
            if bool(values.any()):
                first = flagged[int(values.nonzero()[0, 0])]
                raise ValueError(
                    f'actnn_mm: the activation kept by {first} (and {int(values.sum()) - 1} '
                    f'more) had NaN or Inf values (or a range beyond float32) in an '
                    f'earlier step; on accelerators this is checked without waiting for them, so '
                    f'it is reported a step or two late. Training has likely diverged: lower the '
                    f'learning rate or clip gradients.')

    def record(self, module: torch.nn.Module, nbytes: int, full_bytes: int,
               widths: Optional[torch.Tensor] = None, sample_elements: int = 0,
               statistics_bytes: int = 0) -> None:
        """Note that ``module`` keeps ``nbytes`` where torch would keep ``full_bytes``.

        Args:
            module: the layer.
            nbytes: bytes kept.
            full_bytes: bytes torch would keep for the same purpose.
            widths: bits per sample when the tensor kept is a quantized activation (kept as
                given: read only when :func:`stats` is asked).
            sample_elements: elements per sample of that activation.
            statistics_bytes: bytes of its group statistics (part of ``nbytes``).
        """
        self.kept.setdefault(id(module), []).append(
            _Kept(nbytes, full_bytes, widths, sample_elements, statistics_bytes))

    def record_generic(self, nbytes: int, full_bytes: int, widths: Optional[torch.Tensor],
                       sample_elements: int, statistics_bytes: int = 0) -> None:
        """Note a saved tensor that generic mode compressed, arguments as in :meth:`record`."""
        self.generic.append(_Kept(nbytes, full_bytes, widths, sample_elements, statistics_bytes))

    def record_uncompressed(self, reason: str, nbytes: int) -> None:
        """Note a saved tensor of ``nbytes`` that generic mode left in full precision."""
        self.uncompressed[reason] += nbytes
