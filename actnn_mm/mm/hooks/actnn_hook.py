"""ActNNHook: activation-compressed training for any mmengine Runner."""
import contextlib
import dataclasses
from typing import Any, Optional, Sequence

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ...config import LEVELS, Config, config, set_optimization_level
from ...convert import convert
from ...generic import compress_saved_tensors, report_first_step
from ...layers.state import set_sample_indices
from ...stats import stats
from ..compat import compat_fixes

# Knobs of actnn_mm.config that the hook may set besides the level.
KNOBS = tuple(f.name for f in dataclasses.fields(Config) if f.name != 'level')


@HOOKS.register_module()
class ActNNHook(Hook):
    """Compresses the activations kept for backward during training.

    Before the run it sets the optimization level; before training (after the Runner has applied
    its own ``activation_checkpointing`` and ``efficient_conv_bn_eval``) it converts the model
    (through DDP wrappers) with :func:`actnn_mm.convert`: also the layers a codebase hard-codes (``nn.ReLU`` in ResNets,
    ``nn.Conv2d`` in ``RPNHead``, the MoCo neck), besides those a config already built as ActNN
    layers. Frozen layers and ``norm_eval`` BatchNorms keep working as before: the layers run the
    plain op where nothing needs a gradient. Each training iteration passes the batch's
    ``sample_idx`` to the adaptive allocator and, with ``generic``, compresses what other ops save
    (attention, interpolation, ...); without it, the first iteration logs the modules that keep
    large full-precision activations. Validation and testing run without gradients, so nothing is
    compressed there. The average bits, the MiB kept and the ratio to full precision are logged
    as ``actnn/avg_bits``, ``actnn/mib`` and ``actnn/ratio``. From ``before_run`` to
    ``after_run`` the fixes of :func:`actnn_mm.mm.compat_fixes` are in force: checkpoints in the
    run's work_dir resume under torch's ``weights_only`` default, and mmcv's ``adjust_hue``
    works under numpy 2.

    Args:
        level: ActNN optimization level, 'L0'..'L5'.
        generic: compress what non-ActNN ops save (default: at L3 and above).
        **knobs: other :data:`actnn_mm.config` settings, e.g. ``group_size=128``.
    """

    priority = 'VERY_HIGH'  # convert before other hooks' before_train

    def __init__(self, level: str = 'L3', generic: Optional[bool] = None, **knobs: Any) -> None:
        if level not in LEVELS:
            raise ValueError(f'ActNNHook: unknown level {level!r}; valid levels: '
                             f'{", ".join(LEVELS)}')
        unknown = sorted(set(knobs) - set(KNOBS))
        if unknown:
            raise ValueError(f'ActNNHook: unknown settings {unknown}; valid: level, generic, '
                             f'{", ".join(KNOBS)}')
        self.level = level
        self.generic = LEVELS.index(level) >= LEVELS.index('L3') if generic is None else bool(generic)
        self.knobs = knobs
        self._model = None
        self._generic: Optional[compress_saved_tensors] = None
        self._fixes = contextlib.ExitStack()

    def before_run(self, runner: Any) -> None:
        self._fixes.close()  # those of an earlier run that ended without after_run (an error)
        self._fixes.enter_context(compat_fixes(runner.work_dir))
        set_optimization_level(self.level)
        # the bits first: whether a width or a budget is valid depends on `adaptive`, given after
        for name in sorted(self.knobs, key=lambda knob: knob != 'activation_compression_bits'):
            setattr(config, name, self.knobs[name])

    def before_train(self, runner: Any) -> None:
        # After the Runner's own savers (activation_checkpointing, efficient_conv_bn_eval, whose
        # fx tracing cannot trace the ActNN layers' forward), before the first iteration.
        self._model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        _, summary = convert(self._model)
        runner.logger.info(str(summary))
        report_first_step(self._model)  # without generic mode: what stays in full precision

    def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        set_sample_indices(self._model, _sample_indices(data_batch))
        if self.generic:
            self._generic = compress_saved_tensors(self._model).__enter__()

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None,
                         outputs: Any = None) -> None:
        if self._generic is not None:
            self._generic.__exit__(None, None, None)
            self._generic = None
        step = stats(self._model)  # the layers' and generic mode's
        hub = runner.message_hub
        if step['average_bits'] is not None:
            hub.update_scalar('train/actnn/avg_bits', step['average_bits'])
        hub.update_scalar('train/actnn/mib', step['compressed_bytes'] / 2**20)
        if step['ratio'] is not None:
            hub.update_scalar('train/actnn/ratio', step['ratio'])

    def after_run(self, runner: Any) -> None:
        self._fixes.close()


def _sample_indices(data_batch: Any) -> Optional[Sequence[int]]:
    """The dataset indices of a batch's samples, if the pack transform kept ``sample_idx``."""
    samples = data_batch.get('data_samples') if isinstance(data_batch, dict) else None
    if not samples:
        return None
    indices = [getattr(s, 'metainfo', {}).get('sample_idx') for s in samples]
    return None if any(i is None for i in indices) else indices
