"""Mixed precision on the CPU for mmengine runners (``tools/train.py --amp`` without a GPU)."""
import contextlib
from typing import Any, Iterator

import torch
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(OptimWrapper):
    """:class:`mmengine.optim.OptimWrapper` running forward under bfloat16 autocast on the CPU.

    mmengine's ``AmpOptimWrapper`` needs CUDA (or NPU/MLU). bfloat16 keeps float32's exponent
    range, so no loss scaling is needed and the optimizer steps as usual; ActNN layers then
    compress the bfloat16 activations.

    Args:
        dtype: the autocast dtype; only 'bfloat16' (float16 on the CPU would need loss scaling).
        **kwargs: the arguments of :class:`mmengine.optim.OptimWrapper`.
    """

    def __init__(self, dtype: str = 'bfloat16', **kwargs: Any) -> None:
        if dtype not in ('bfloat16', torch.bfloat16):
            raise ValueError(f'CPUAmpOptimWrapper: dtype must be bfloat16, got {dtype!r}')
        super().__init__(**kwargs)

    @contextlib.contextmanager
    def optim_context(self, model: torch.nn.Module) -> Iterator[None]:
        """The parent's context (gradient accumulation) plus bfloat16 autocast on the CPU."""
        with super().optim_context(model), torch.autocast('cpu', dtype=torch.bfloat16):
            yield
