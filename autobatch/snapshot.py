"""Probing a user's own trainer without changing what it will train: what is saved, and put back after.

`plan_trainer` runs its trials through the user's trainer object, so everything a `train()` call touches is
saved first and restored after: the trainer's attributes (args, datasets, optimizer, scheduler, state,
control, cached batch size, the contents of containers such as SFTTrainer's `_metrics`), the parameters' gradients, the callback list and the handler's references, accelerate's prepared
objects, the model's train/eval mode, and the python, numpy and torch RNG. The weights are not copied (a
7B model's copy would not fit): trials step the optimizer at learning rate 0 (`ZeroLearningRate`), which
allocates the same state and changes no weight. Callbacks see the trials on deep copies, so their own
counters and histories are untouched while what they allocate is still measured.
"""

from __future__ import annotations

import copy
import logging
import random

logger = logging.getLogger(__name__)

_ACCELERATOR_LISTS = ("_optimizers", "_schedulers", "_dataloaders", "_models")


class ZeroLearningRate:
    """Trainer callback: every param group's lr is 0 just before each optimizer step.

    Set right before `optimizer.step()` (after the scheduler wrote its value), so it holds whatever
    `optim`, `optimizer_cls_and_kwargs` or scheduler the trainer uses. AdamW then adds `-0 × update` and
    decays by `1 - 0 × weight_decay`: bit-identical weights (tested). An optimizer that computes its own
    step size and ignores `lr` (Adafactor with `relative_step=True`) would still move the weights.
    """

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        for group in optimizer.param_groups:
            group["lr"] = 0.0

    def __getattr__(self, name: str):  # every other TrainerCallback event: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def rng_state() -> dict:
    """python, numpy and torch (cpu and initialised cuda) generator states."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainerSnapshot:
    """What `train()` may change on a trainer, taken before trials and put back by `restore()`."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.attributes = dict(vars(trainer))
        # Containers train() fills in place (SFTTrainer's `_metrics` collects every step's loss metrics until
        # the next log): their contents now, put back into the same objects.
        shared = _shared_objects(trainer)
        self.contents = []
        for value in self.attributes.values():
            if type(value) in (dict, list, set) and id(value) not in shared:  # not a dict of eval datasets
                try:
                    self.contents.append((value, copy.deepcopy(value, dict(shared))))
                except Exception:  # noqa: BLE001 - not copyable: left as train() leaves it
                    logger.debug("not restored: %r", value)
        handler = trainer.callback_handler
        self.handler = dict(vars(handler))
        self.callbacks = list(handler.callbacks)
        accelerator = trainer.accelerator
        self.accelerator = dict(vars(accelerator))
        self.accelerator_lists = {name: list(getattr(accelerator, name, [])) for name in _ACCELERATOR_LISTS}
        self.modes = [(module, module.training) for module in trainer.model.modules()]
        self.grads = [(param, param.grad) for param in trainer.model.parameters()]
        for param, _ in self.grads:  # trials accumulate into .grad in place: keep the caller's out of reach
            param.grad = None
        self.rng = rng_state()

    def restore(self) -> None:
        """The trainer as it was: trial-made attributes dropped, saved ones rebound, RNG rewound."""
        trainer = self.trainer
        vars(trainer).clear()
        vars(trainer).update(self.attributes)
        for container, content in self.contents:
            container.clear()
            (container.update if isinstance(container, (dict, set)) else container.extend)(content)
        handler = trainer.callback_handler
        vars(handler).clear()
        vars(handler).update(self.handler)
        handler.callbacks[:] = self.callbacks
        accelerator = trainer.accelerator
        vars(accelerator).clear()
        vars(accelerator).update(self.accelerator)
        for name, saved in self.accelerator_lists.items():
            if hasattr(accelerator, name):
                getattr(accelerator, name)[:] = saved
        for module, training in self.modes:
            module.training = training
        for param, grad in self.grads:
            param.grad = grad
        set_rng_state(self.rng)


def trial_callbacks(trainer) -> list:
    """The trainer's callbacks for a trial: deep copies, less progress printing and experiment reporting.

    The model, trainer and every tensor are shared with the copy rather than copied (a callback that keeps
    the model must not duplicate it); a callback that cannot be copied is used as it is.
    """
    from transformers import PrinterCallback, ProgressCallback
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    skipped = (PrinterCallback, ProgressCallback, *INTEGRATION_TO_CALLBACK.values())
    shared = _shared_objects(trainer)
    callbacks = []
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, skipped):
            continue
        try:
            callbacks.append(copy.deepcopy(callback, dict(shared)))
        except Exception as exc:  # noqa: BLE001 - locks, files, handles: the original sees the trials
            logger.warning("%s could not be copied (%s): it sees the probe's trial steps",
                           type(callback).__name__, exc)
            callbacks.append(callback)
    return callbacks


def _shared_objects(trainer) -> dict[int, object]:
    """deepcopy memo entries that make these objects copy to themselves."""
    import torch

    objects = [trainer, trainer.model, trainer.args, trainer.accelerator, trainer.processing_class,
               trainer.train_dataset, trainer.eval_dataset, trainer.data_collator, trainer.optimizer,
               trainer.lr_scheduler, *trainer.model.parameters(), *trainer.model.buffers(),
               *trainer.model.modules()]
    shared = {id(o): o for o in objects if o is not None}
    for callback in trainer.callback_handler.callbacks:
        for value in vars(callback).values():
            if isinstance(value, torch.Tensor):
                shared[id(value)] = value
    return shared
