"""What the ActNN layers of one model share: its allocator, its step log, its sharing cache, and
when its training steps begin.

Each model converted by :func:`actnn_mm.convert` owns a :class:`ModelState` (two models trained
in one process, e.g. MoCo's two encoders or a GAN's generator and discriminator, keep separate
budgets and statistics). A layer built directly and trained on its own gets a state of its own.

A step begins when one of the model's layers keeps an activation (a forward in training with
gradients enabled) after the model's backward ran, outside a backward pass: several forward
passes before one backward (a discriminator on real and fake images) are one step, and a forward
recomputed inside the backward pass by activation checkpointing (``torch.utils.checkpoint``,
``with_cp=True``, mmengine's ``activation_checkpointing``) is part of the step it belongs to.
"""
import weakref
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch import nn

from ..allocate import Allocator
from ..steplog import StepLog

_STATE = '_actnn_state'


class ModelState:
    """The per-model state of the ActNN layers (see the module docstring).

    Attributes:
        allocator: the adaptive bit allocator (L3).
        step_log: what the layers kept in the current step.
        shared: id(activation) -> (weak activation, its version, quantization settings, weak
            stored copy): an activation read by several layers is compressed once.
        Also L4's side streams (:meth:`swap_stream`).
    """

    def __init__(self) -> None:
        self.allocator = Allocator()
        self.step_log = StepLog()
        self.shared: Dict[int, Tuple[weakref.ref, int, tuple, weakref.ref]] = {}
        self._backward_ran = False
        self._swap_streams: Dict[torch.device, torch.cuda.Stream] = {}

    def __deepcopy__(self, memo: Dict[int, Any]) -> 'ModelState':
        return ModelState()  # a copy of a model learns afresh

    def __reduce__(self) -> Tuple[Any, ...]:
        return ModelState, ()

    def attach(self, layers: Iterable[nn.Module]) -> None:
        """Make this the state of ``layers`` (and of the module holding them)."""
        for layer in layers:
            layer.__dict__[_STATE] = self

    def step_boundary(self) -> None:
        """Begin a new step if the model's backward ran since the last one began, unless this
        is called inside a backward pass (a checkpointed forward being recomputed)."""
        if self._backward_ran and torch._C._current_graph_task_id() == -1:
            self._backward_ran = False
            self.allocator.begin_step()
            self.step_log.begin_step()

    def swap_stream(self, device: torch.device) -> torch.cuda.Stream:
        """The side stream of L4's copies to and from ``device``."""
        if device not in self._swap_streams:
            self._swap_streams[device] = torch.cuda.Stream(device)
        return self._swap_streams[device]

    def backward_runs(self) -> None:
        """Note that a backward pass reads what the layers kept."""
        self._backward_ran = True


def state_of(module: nn.Module) -> ModelState:
    """The state of an ActNN layer: its model's, or its own if it was never part of a
    converted model."""
    state = module.__dict__.get(_STATE)
    if state is None:
        state = ModelState()
        state.attach([module])
    return state


def forget_state(module: nn.Module) -> None:
    """Detach ``module`` from its model's state (when it is reverted)."""
    module.__dict__.pop(_STATE, None)


def model_state(model: nn.Module) -> ModelState:
    """The state of ``model``'s ActNN layers (the first found, if several), else one attached
    to ``model`` itself."""
    return next(iter(states_in(model).values()), None) or state_of(model)


def states_in(model: nn.Module) -> Dict[int, ModelState]:
    """The states of the layers in ``model``, by id."""
    states = {}
    for module in model.modules():
        state = module.__dict__.get(_STATE)
        if state is not None:
            states[id(state)] = state
    return states


def set_sample_indices(model: nn.Module, indices: Optional[Sequence[int]]) -> None:
    """Tell ``model``'s allocator which dataset samples its next forward pass holds (dim 0
    order).

    With indices, each sample's gradient magnitude is remembered from the last time it was seen,
    as ActNN does; without, the layer's running mean stands for every sample.

    Args:
        model: the converted model.
        indices: one dataset index per sample, or None.
    """
    model_state(model).allocator.set_sample_indices(indices)
