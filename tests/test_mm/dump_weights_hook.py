"""A test-only hook: each rank saves its final weights (mmengine saves only rank 0's)."""
import os

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class DumpWeightsHook(Hook):
    def __init__(self, out: str) -> None:
        self.out = out

    def after_run(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        torch.save(model.state_dict(), os.path.join(self.out, f'rank{get_rank()}.pth'))
