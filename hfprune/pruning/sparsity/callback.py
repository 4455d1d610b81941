# Copyright hfprune contributors. Apache-2.0.
"""``SparsityCallback``: weight-level sparsity while the stock ``transformers.Trainer`` trains.

- ``ScheduleConfig(kind="gradual")``: gradual magnitude (or movement) pruning on Zhu & Gupta's cubic schedule,
  sparsity ``s_f * (1 - (1 - t)^3)`` at the schedule's update steps.
- ``kind="iterative"``: ``rounds`` prune rounds with training in between; ``rewind_step=k`` resets the kept weights
  to their values after ``k`` optimizer steps at every round (lottery-ticket rewinding; the optimizer's state is
  kept as it is).
- ``kind="oneshot"``: one mask at ``start_step`` (N:M patterns only come this way).
- ``config=None``: no new pruning; the model's zeros when training starts (say, after ``hfprune.sparsify``) are kept.

Masks only grow. Masked weights stay exactly zero: their gradients are zeroed before every optimizer step (after
gradient accumulation and DDP's all-reduce, so every rank does the same) and the weights are re-zeroed right after
it, so momentum and weight decay cannot move them. Each Trainer checkpoint gets ``hfprune_sparsity.safetensors``
(packed masks, movement scores, the rewind snapshot) and ``hfprune_sparsity_state.json``; resuming reads them.
Movement scores accumulate ``-dL/dW * W`` at every optimizer step. Distillation (``DistillationTrainer``) works
unchanged: the callback only touches weights and gradients. ``PruningCallback`` drives this class when it is given
weight sparsity (:mod:`hfprune.pruning.combined`); ``structure`` then names the weights its masks on heads and
neurons remove, which the ranking leaves out.
"""

from __future__ import annotations

import json
import os

import torch
from transformers import TrainerCallback

from ...core.apply import unwrap
from ...core.checkpoint.sparse import pack_bits, unpack_bits
from ...core.sharded import check_supported_sharding, is_sharded
from ...core.structure import base_layer, is_conv1d
from ..schedule import ScheduleConfig, fraction_at, prune_steps
from .config import SparsityConfig
from .oneshot import PLAN_ATTRIBUTE
from .patterns import check_shape, mask_for
from .targets import apply_masks, find_targets, plan_from_weights

STATE_FILE = "hfprune_sparsity_state.json"
TENSORS_FILE = "hfprune_sparsity.safetensors"
TRAINING_CRITERIA = ("magnitude", "movement", "random")


class SparsityCallback(TrainerCallback):
    """Sparsify weights during ``Trainer.train()`` on a schedule, keeping masked weights at zero.

    Args:
        config: criterion (``magnitude``, ``movement`` or ``random``), final sparsity and pattern; ``None`` keeps
            the zeros the model has when training starts.
        schedule: when; ``None``: gradual (cubic) over the first two thirds of the run.
        rewind_step: iterative schedules: after each round, reset the kept weights to their values at this step.

    Example:

    ```python
    >>> from hfprune.pruning.schedule import ScheduleConfig
    >>> from hfprune.pruning.sparsity import SparsityConfig
    >>> from hfprune.pruning.sparsity.callback import SparsityCallback
    >>> callback = SparsityCallback(SparsityConfig(criterion="magnitude", sparsity=0.8),
    ...                             ScheduleConfig(kind="gradual", start_step=0, end_step=300, every=30))
    >>> # Trainer(model, args, train_dataset=..., callbacks=[callback]).train()
    ```
    """

    def __init__(self, config: SparsityConfig | None = None, schedule: ScheduleConfig | None = None,
                 rewind_step: int | None = None):
        if config is not None and not isinstance(config, SparsityConfig):
            raise TypeError(f"config must be a SparsityConfig or None, got {type(config).__name__}")
        if schedule is not None and not isinstance(schedule, ScheduleConfig):
            raise TypeError(f"schedule must be a ScheduleConfig or None, got {type(schedule).__name__}")
        schedule = schedule or ScheduleConfig(kind="gradual")
        if config is not None:
            if config.criterion not in TRAINING_CRITERIA:
                raise ValueError(f"criterion={config.criterion!r} is one-shot (hfprune.sparsify); during training use "
                                 f"one of {TRAINING_CRITERIA}, or sparsify first and pass config=None to keep its "
                                 "zeros")
            if config.ratios != "uniform":
                raise ValueError(f"ratios={config.ratios!r} is one-shot; SparsityCallback uses ratios='uniform'")
            if config.parsed_pattern.kind == "n:m" and schedule.kind != "oneshot":
                raise ValueError(f"pattern={config.pattern!r} is reached in one step; use "
                                 "ScheduleConfig(kind='oneshot')")
        if rewind_step is not None and (config is None or schedule.kind != "iterative" or rewind_step is True
                                        or not isinstance(rewind_step, int) or rewind_step < 0):
            raise ValueError(f"rewind_step={rewind_step!r} goes with a SparsityConfig and "
                             "ScheduleConfig(kind='iterative'), and is an int >= 0")
        self.config, self.schedule, self.rewind_step = config, schedule, rewind_step
        self.model = None
        self.targets: list = []
        self.masks: dict = {}
        self.movement: dict = {}
        self.rewind: dict = {}
        self.events_done: list = []
        self._resolved: ScheduleConfig | None = None
        self._pending: str | None = None
        # () -> {name: bool (out, in)}: weights that masks on heads and neurons remove (set by PruningCallback)
        self.structure = None

    def check(self, model, args=None) -> list:
        """The targets of ``model``, or an error for a model whose weights cannot carry masks; changes nothing."""
        model = unwrap(model)
        check_supported_sharding(model, args)
        if is_sharded(model):
            raise NotImplementedError("weight sparsity during training keeps full-size masks beside each weight, "
                                      "which FSDP2's sharded weights are not; train with DDP (or one process)")
        targets = find_targets(model, self.config.targets if self.config else "blocks")
        if self.config is not None:
            for t in targets:
                check_shape(t.shape, self.config.parsed_pattern, t.name)
        return targets

    def load_state(self, checkpoint_dir) -> None:
        """Resume from ``checkpoint_dir`` (found automatically when it is in the run's ``output_dir``)."""
        self._pending = os.fspath(checkpoint_dir)

    # -- Trainer events ------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.targets = self.check(model, args)
        self.model = unwrap(model)
        self._resolved = self.schedule.resolve(state.max_steps)
        self.masks = {t.name: t.weight().detach().ne(0) if self.config is None else
                      torch.ones(t.shape, dtype=torch.bool, device=t.weight().device) for t in self.targets}
        self.movement = {t.name: torch.zeros(t.shape, device=t.weight().device) for t in self.targets} \
            if self.config is not None and self.config.criterion == "movement" else {}
        self.rewind, self.events_done = {}, []
        directory = self._pending or (os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                                      if state.global_step > 0 else None)
        self._pending = None
        if directory is not None:
            self._restore(directory, required=state.global_step > 0)
        if self.rewind_step == 0 and not self.rewind:
            self._snapshot()
        if self.config is not None:
            due = [t for t in prune_steps(self._resolved) if t <= state.global_step and t not in self.events_done]
            if due:
                self.events_done += due[:-1]
                self._prune(due[-1])
        apply_masks(self.targets, self.masks)
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for t in self.targets:
            grad = _grad_view(t)
            if grad is None:
                continue
            if t.name in self.movement:
                self.movement[t.name] -= (grad * t.weight().detach()).float()
            grad.mul_(self.masks[t.name].to(grad.dtype))
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        apply_masks(self.targets, self.masks)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if not self.targets:
            return control
        apply_masks(self.targets, self.masks)
        step = state.global_step
        if self.rewind_step is not None and step == self.rewind_step and not self.rewind:
            self._snapshot()
        if self.config is not None and step in prune_steps(self._resolved) and step not in self.events_done:
            self._prune(step)
            apply_masks(self.targets, self.masks)
        return control

    def on_save(self, args, state, control, **kwargs):
        if not self.targets or not state.is_world_process_zero:
            return control
        directory = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(directory):
            self.save_state(directory)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.load_best(args, state)
        self.finish()
        return control

    def finish(self) -> None:
        """Zero the masked weights a last time and leave the :class:`SparsityPlan` on the model."""
        if self.targets:
            apply_masks(self.targets, self.masks)
            pattern = str(self.config.parsed_pattern) if self.config else "unstructured"
            setattr(self.model, PLAN_ATTRIBUTE, plan_from_weights(
                self.targets, pattern, self.config.to_dict() if self.config else None))

    # -- pruning and state ---------------------------------------------------------------------

    def load_best(self, args, state) -> None:
        """With ``load_best_model_at_end``, the best checkpoint's masks, as its weights are (masks only grow)."""
        best = state.best_model_checkpoint if args.load_best_model_at_end else None
        if best and os.path.isfile(os.path.join(best, TENSORS_FILE)):
            self._restore(best, required=True)

    @property
    def sparsity(self) -> float:
        """The share of masked weights now, among those the structure (heads and neurons) keeps."""
        removed = self.structure() if self.structure is not None else {}
        zeros = total = 0
        for name, mask in self.masks.items():
            kept = ~removed[name] if name in removed else torch.ones_like(mask)
            zeros += int((~mask & kept).sum())
            total += int(kept.sum())
        return zeros / max(total, 1)

    def _prune(self, step: int) -> None:
        self.events_done.append(step)
        target = fraction_at(self._resolved, step) * self.config.resolved_sparsity
        pattern = self.config.parsed_pattern
        generator = torch.Generator().manual_seed(self.config.seed + step)
        removed = self.structure() if self.structure is not None else {}
        for t in self.targets:
            if self.config.criterion == "movement":
                scores = self.movement[t.name].clone()
            elif self.config.criterion == "random":
                scores = torch.rand(t.shape, generator=generator).to(t.weight().device)
            else:
                scores = t.weight().detach().abs().float()
            scores[~self.masks[t.name]] = float("-inf")  # masks only grow
            share = target
            if t.name in removed:  # going with their heads / neurons: kept here, and the zeros are a share of the rest
                scores[removed[t.name]] = float("inf")
                share = target * float((~removed[t.name]).sum()) / scores.numel()
            self.masks[t.name] = mask_for(scores, pattern, share) & self.masks[t.name]
        if self.rewind:
            with torch.no_grad():
                for t in self.targets:
                    t.weight().copy_(self.rewind[t.name].to(t.weight().device))
        apply_masks(self.targets, self.masks)

    def _snapshot(self) -> None:
        self.rewind = {t.name: t.weight().detach().to("cpu", copy=True) for t in self.targets}

    def save_state(self, directory) -> None:
        """Write the masks, scores and rewind snapshot (safetensors) and the schedule position (JSON)."""
        from safetensors.torch import save_file

        tensors = {}
        for name, mask in self.masks.items():
            tensors[f"mask.{name}"] = pack_bits(mask)
        tensors.update({f"movement.{k}": v.detach().cpu().contiguous() for k, v in self.movement.items()})
        tensors.update({f"rewind.{k}": v.contiguous() for k, v in self.rewind.items()})
        save_file(tensors, os.path.join(directory, TENSORS_FILE))
        state = {"format": 1, "events_done": self.events_done, "schedule": self._resolved.to_dict(),
                 "config": self.config.to_dict() if self.config else None, "rewind_step": self.rewind_step}
        with open(os.path.join(directory, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(state, f)

    def _restore(self, directory: str, required: bool) -> None:
        path = os.path.join(directory, TENSORS_FILE)
        if not os.path.isfile(path):
            if required:
                raise FileNotFoundError(f"resuming, but the sparsity state {path} is missing; call "
                                        "callback.load_state(<checkpoint dir>) when the checkpoint is elsewhere")
            return
        from safetensors.torch import load_file

        tensors = load_file(path)
        with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
        self.events_done = [int(t) for t in state["events_done"]]
        for t in self.targets:
            key = f"mask.{t.name}"
            if key not in tensors:
                raise ValueError(f"{path} has no mask for {t.name}: it was saved for another model")
            numel = t.weight().numel()
            self.masks[t.name] = unpack_bits(tensors[key], numel).reshape(t.shape).to(t.weight().device)
            if t.name in self.movement and f"movement.{t.name}" in tensors:
                self.movement[t.name] = tensors[f"movement.{t.name}"].to(t.weight().device)
            if f"rewind.{t.name}" in tensors:
                self.rewind[t.name] = tensors[f"rewind.{t.name}"]


def _grad_view(target):
    """The gradient of a target's base weight as (out, in) (a Conv1D's is stored transposed)."""
    base = base_layer(target.module)
    if base.weight.grad is None:
        return None
    return base.weight.grad.T if is_conv1d(base) else base.weight.grad
