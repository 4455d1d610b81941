# Copyright hfprune contributors. Apache-2.0.
"""``PruningCallback``: prune while training with the stock ``transformers.Trainer``.

During training nothing is sliced: heads and neurons are *masked* (``hfprune.core.masking.Masks`` gates on the
input of each block's output projection), so the optimizer's state and DDP's buckets stay valid and every
parameter keeps taking part in the graph (DDP needs no ``find_unused_parameters``). Masked weights get exactly
zero gradient and are reset to zero after every optimizer step, so momentum and weight decay cannot move them.
When training ends the model is sliced in place (``apply_plan``), and ``trainer.save_model()`` writes a pruned
checkpoint that reloads with ``from_pretrained(dir, trust_remote_code=True)``.

Scores come from the run itself, in the form each criterion declares (``Importance.training_signal``): from the
gates' gradients at each optimizer step (averaged over ranks like DDP averages parameter gradients; ``fisher``
squares them, ``taylor`` takes their absolute value: see :mod:`hfprune.pruning.importance.taylor` for how that differs
from one-shot Taylor), from the inputs of the output projections (``activation``), or, for a criterion that reads
only the weights (``magnitude``, ``random``), from the weights at each pruning step. With ``calibration``, the
criterion scores that data at each pruning step, as one-shot pruning does. Scores accumulate between two pruning
steps.

Layers are never dropped during training (a dropped layer's parameters would get no gradient and DDP would
need ``find_unused_parameters``); a layer may lose all its heads and neurons, which compaction turns into
bias-only blocks.

With ``sparsity=SparsityConfig(...)`` (or a ``SparsityConfig`` as ``config``: weights alone) it also masks single
weights, through the :class:`~hfprune.pruning.sparsity.callback.SparsityCallback` it drives, and carries those masks
onto the sliced weights (:mod:`hfprune.pruning.combined`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable

import torch
from transformers import TrainerCallback
from transformers.utils import logging

from ..core import cost
from ..core.apply import apply_plan, as_model
from ..core.calibration import calibration_batches, check_batches
from ..core.distributed import broadcast_from_first, mean_across_ranks
from ..core.masking import Masks
from ..core.plan import PlanError, PrunePlan, intersect_plans
from ..core.sharded import check_training, compact_sharded, fill_slices_, is_sharded
from .activation_watch import ActivationWatch
from .combined import check_before_training, cut_masks, removed_slices, retarget, split_arguments, structure_removed
from .config import PruningConfig
from .importance.base import ACTIVATIONS, GATE_GRADIENTS, GRADIENTS, WEIGHTS
from .schedule import ScheduleConfig, budget_at, fraction_at, prune_steps
from .sparsity.config import SparsityConfig

logger = logging.get_logger(__name__)

STATE_FILE = "hfprune_pruning_state.json"
STATE_FORMAT = 1
CALIBRATION = "calibration"  # a score source besides the criteria's signals: the given calibration batches


class PruningCallback(TrainerCallback):
    """Prune a model during ``Trainer.train()`` on a schedule, then slice it when training ends.

    Args:
        config: what to prune and the final budget (:class:`~hfprune.PruningConfig`); a
            :class:`~hfprune.SparsityConfig` prunes single weights only.
        schedule: when (:class:`~hfprune.pruning.schedule.ScheduleConfig`); ``None``: gradual (cubic) over the first
            two thirds of the run.
        calibration: batches to score on at each pruning step (model-ready dicts); ``None``: score from training.
        sparsity: single-weight sparsity beside the heads and neurons (a ``SparsityConfig``, pattern
            ``unstructured``), counted among the weights they keep; ``"keep"``: the model's zeros stay zero.
        sparsity_schedule: when to prune weights; ``None``: ``schedule``. It may not end before ``schedule``.
        rewind_step: iterative weight pruning: after each round, reset the kept weights to their values at this step.

    Logged with the Trainer's logs: ``prune/fraction`` (of the final removal), ``prune/macs_ratio`` and
    ``prune/params_ratio`` (of the dense model), ``prune/heads``, ``prune/neurons`` (kept), ``prune/sparsity``
    (of the weights kept). Reporting integrations (TensorBoard, W&B) run before user callbacks; :func:`put_first`
    moves this one ahead of them.

    Example:

    ```python
    >>> from transformers import Trainer, TrainingArguments
    >>> from hfprune import PruningConfig, SparsityConfig
    >>> from hfprune.pruning.callback import PruningCallback
    >>> from hfprune.pruning.schedule import ScheduleConfig
    >>> callback = PruningCallback(PruningConfig(criterion="fisher", macs_ratio=0.5),
    ...                            ScheduleConfig(kind="gradual", start_step=0, end_step=300, every=30))
    >>> both = PruningCallback(PruningConfig(macs_ratio=0.5), sparsity=SparsityConfig(sparsity=0.5))  # + weights
    >>> # Trainer(model, args, train_dataset=..., callbacks=[callback]).train(); trainer.save_model()
    ```
    """

    # its prune/* metrics are added to the logs in on_log: trainers move it ahead of the reporting integrations
    logs_metrics_first = True

    def __init__(self, config: PruningConfig | SparsityConfig, schedule: ScheduleConfig | None = None,
                 calibration: Iterable | None = None, *, sparsity: SparsityConfig | str | None = None,
                 sparsity_schedule: ScheduleConfig | None = None, rewind_step: int | None = None):
        config, self.sparse = split_arguments(config, schedule, calibration, sparsity, sparsity_schedule, rewind_step)
        self.config = config
        self.schedule = schedule if schedule is not None else ScheduleConfig(kind="gradual")
        self.masks: Masks | None = None
        self.model = None
        self.plan: PrunePlan | None = None
        self.pruned_model = None  # the sliced model when training ends; under FSDP2 a gathered copy, on rank 0 only
        self.events_done: list = []
        self._zero_targets: list = []
        self._summary: dict = {}
        if config is None:  # single weights only: self.sparse does it all
            return
        if getattr(config, "target", "blocks") == "hidden":
            raise ValueError("target='hidden' prunes in one shot (hfprune.prune); PruningCallback masks heads and "
                             "neurons while training")
        calibration = check_batches(None, calibration)  # its type now; its keys when the model is known
        if config.bias_compensation or config.resolved_recovery not in ("none", "rearrange"):
            raise ValueError(
                f"PruningCallback masks units during training, where the model itself recovers; "
                f"bias_compensation={config.bias_compensation} and recovery={config.recovery!r} are one-shot "
                "(hfprune.prune) options: use bias_compensation=False and recovery 'auto' or 'none'")
        self.calibration = calibration
        # built once for its training-time form and for calibration scoring; no recovery runs here
        self.criterion = config.build_importance(for_recovery=False)
        if calibration is not None:
            self.source = CALIBRATION
        elif not self.criterion.needs_data:
            self.source = WEIGHTS
        elif self.criterion.training_signal is not None:
            self.source = self.criterion.training_signal
        else:
            raise ValueError(f"criterion {config.criterion!r} cannot score from training; pass calibration batches")
        self._scores: dict = {}
        self._score_steps = 0
        self._activations: ActivationWatch | None = None
        self._resolved: ScheduleConfig | None = None
        self._pending_state: dict | None = None
        self._dense = None
        self._latency = None

    # -- public helpers ------------------------------------------------------------------------

    def load_state(self, checkpoint_dir) -> None:
        """Resume from the pruning state in ``checkpoint_dir`` (found automatically when the checkpoint is in
        the run's ``output_dir``), and the weight masks' state with it."""
        if self.sparse is not None:
            self.sparse.load_state(checkpoint_dir)
        if self.config is not None:
            with open(os.path.join(checkpoint_dir, STATE_FILE), encoding="utf-8") as f:
                self._pending_state = json.load(f)

    def state_dict(self) -> dict:
        """The JSON-able state that checkpoints carry: schedule position, plan, and accumulated scores."""
        return {
            "format": STATE_FORMAT,
            "config": self.config.to_dict() if self.config is not None else None,
            "schedule": self._resolved.to_dict() if self._resolved else self.schedule.to_dict(),
            "events_done": list(self.events_done),
            "plan": self.masks.to_plan().to_dict() if self.masks is not None else None,
            "score_steps": self._score_steps,
            "scores": {_key_str(k): [float(x) for x in v.tolist()] for k, v in sorted(self._scores.items())},
        }

    # -- Trainer events ------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.sparse is not None:  # its checks first, while nothing has changed
            check_before_training(self.schedule if self.config else None, self.sparse, model, args, state.max_steps)
        if self.config is not None:
            self._begin(args, state, model)
            if self.sparse is not None:  # the weights of masked heads and neurons are left out of its ranking
                self.sparse.structure = lambda: structure_removed(self.sparse.targets, self._zero_targets)
        if self.sparse is not None:
            self.sparse.on_train_begin(args, state, control, model=model, **kwargs)
        return control

    def _begin(self, args, state, model) -> None:
        target = as_model(model)
        self.calibration = check_batches(target, self.calibration)
        self.calibration = calibration_batches(self.calibration, self.config.calibration_batch_size)
        check_training(target, args, self.calibration if self.source == CALIBRATION else None,  # ZeRO-3; FSDP2 limits
                       latency=getattr(self.config, "budget_kind", None) == "latency",
                       weight_gradients=self.source == CALIBRATION and self.criterion.signal == GRADIENTS)
        self.model = target
        self._resolved = self.schedule.resolve(state.max_steps)
        steps = prune_steps(self._resolved)
        if state.max_steps > 0 and steps[-1] > state.max_steps:
            logger.warning(f"hfprune: the schedule's last pruning step ({steps[-1]}) is after max_steps "
                           f"({state.max_steps}); the budget will not be reached")
        self._dense = cost.estimate(target, seq_len=self.config.seq_len)
        if getattr(self.config, "budget_kind", None) == "latency" and self._latency is None:
            from .latency import measure

            self._latency = measure(target, self.config.latency_batch_size, self.config.seq_len)
        from .oneshot import check_budget

        try:  # the final budget, before the first training step and checkpoint rather than at the first prune
            check_budget(target, self.config, self._latency)
        except PlanError as err:
            raise PlanError(f"PruningCallback: the final budget cannot be reached on this model: {err}") from None
        self.masks = Masks(target)
        if state.global_step > 0 and self._pending_state is None:
            self._pending_state = self._find_state(args, state)
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None
        else:
            self.events_done, self._scores, self._score_steps = [], {}, 0
        if self.source == GATE_GRADIENTS:
            for gate in self.masks.gates.values():
                gate.requires_grad_(True)
        self.masks.attach()
        if self.source == ACTIVATIONS:
            self._activations = ActivationWatch(self.model, self.criterion).attach()
        due = [t for t in steps if t <= state.global_step and t not in self.events_done]
        if due:  # pruning at step 0 (or steps missed before a resume without state)
            if self.source in (GATE_GRADIENTS, ACTIVATIONS):
                raise ValueError(f"the schedule prunes at step {due[-1]} before any training step, but criterion "
                                 f"{self.config.criterion!r} scores from training; pass calibration batches, start "
                                 "the schedule later, or use 'magnitude'")
            self._prune(due[-1], extra_done=due[:-1])
        self._refresh()

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.sparse is not None:  # masked weights' gradients to zero, after accumulation and DDP's all-reduce
            self.sparse.on_pre_optimizer_step(args, state, control)
        if self.masks is None or self.source != GATE_GRADIENTS:
            return control
        gates = list(self.masks.gates.values())
        grads = torch.cat([g.grad.detach().float().flatten() if g.grad is not None else torch.zeros_like(g).flatten()
                           for g in gates])
        for g in gates:
            g.grad = None
        scaler = getattr(optimizer, "scaler", None)
        if scaler is not None and scaler.is_enabled():  # fp16: gate gradients carry the loss scale
            grads = grads / scaler.get_scale()
        grads = mean_across_ranks(grads)
        if not torch.isfinite(grads).all():
            return control  # an overflowing fp16 step: the optimizer skips it, so do we
        self._accumulate(self.criterion.gate_terms(grads))
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.sparse is not None:
            self.sparse.on_optimizer_step(args, state, control)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self.masks is not None:
            flat = self._activations.flush(self.masks.gates) if self._activations is not None else None
            if flat is not None:
                self._accumulate(flat)
            self._zero_masked_weights()
            if step in prune_steps(self._resolved) and step not in self.events_done:
                self._prune(step)
                self._refresh()
                control.should_log = True
        if self.sparse is not None and self.sparse.targets:  # after the structure: it ranks what the structure keeps
            self.sparse.on_step_end(args, state, control)
            if step in self.sparse.events_done:
                control.should_log = True
                if self.masks is not None:  # a rewind restores the weights of masked heads and neurons too
                    self._zero_masked_weights()
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not any(k in logs for k in ("loss", "train_loss")):
            return control
        summary = dict(self._summary if self.masks is not None else {})
        if self.sparse is not None and self.sparse.targets:
            summary["prune/sparsity"] = round(self.sparse.sparsity, 6)
        if not summary:
            return control
        logs.update(summary)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(summary)
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.sparse is not None:
            self.sparse.on_save(args, state, control)
        if self.masks is None or not state.is_world_process_zero:
            return control
        directory = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(directory):
            _write_json(os.path.join(directory, STATE_FILE), self.state_dict())
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.sparse is not None:
            self.sparse.load_best(args, state)
        if self.masks is not None:
            self._slice(args, state, model)
        if self.sparse is not None:
            self.sparse.finish()
        return control

    def _slice(self, args, state, model) -> None:
        plan = self.masks.to_plan()
        if args.load_best_model_at_end and state.best_model_checkpoint:
            path = os.path.join(state.best_model_checkpoint, STATE_FILE)
            if os.path.isfile(path):  # the weights are the best checkpoint's: so must the plan be
                with open(path, encoding="utf-8") as f:
                    plan = PrunePlan.from_dict(json.load(f)["plan"])
        if self._activations is not None:
            self._activations.remove()
        self.masks.remove()
        for gate in self.masks.gates.values():
            gate.requires_grad_(False)
        self.plan = plan
        target = model if model is not None else self.model
        cut = cut_masks(self.sparse, self.model, plan) if self.sparse is not None else None
        # FSDP2: the shards cannot be sliced in place; rank 0 slices a gathered copy that trainer.save_model() saves
        self.pruned_model = compact_sharded(target, plan) if is_sharded(target) else apply_plan(target, plan)
        if cut is not None:  # the weight masks go with the sliced weights (FSDP2 was refused before training)
            retarget(self.sparse, self.model, cut)
        self.masks = None

    # -- pruning -------------------------------------------------------------------------------

    def _prune(self, step: int, extra_done: Iterable = ()) -> None:
        fraction = fraction_at(self._resolved, step)
        self.events_done += [*extra_done, step]
        if fraction <= 0:
            return
        scores = self._current_scores()
        before = self.masks.to_plan()
        for key, gate in self.masks.gates.items():  # removed stays removed: rank masked units last
            if key not in scores:
                continue  # a block the criterion does not score (an expert criterion's heads): kept
            scores[key] = torch.where(gate.detach().cpu() != 0, scores[key].float().cpu(), torch.zeros(()))
        from .oneshot import plan_from_scores

        cfg = budget_at(self.config, fraction)
        kwargs = {"latency": self._latency} if self._latency is not None else {}
        plan = intersect_plans(plan_from_scores(self.model, scores, cfg, **kwargs), before)
        self.masks.set_plan(plan)
        broadcast_from_first(self.masks.gates.values())  # belt and braces: every rank applies rank 0's plan
        self._scores, self._score_steps = {}, 0
        self._build_zero_targets()
        self._zero_masked_weights()
        logger.info(f"hfprune: step {step}: pruned to {fraction:.3f} of the final removal")

    def _current_scores(self) -> dict:
        if self.source == CALIBRATION:
            was_training = self.model.training
            self.model.eval()
            try:
                return self.criterion.score(self.model, self.calibration)
            finally:
                self.model.train(was_training)
        if self.source == WEIGHTS:  # a seeded criterion draws anew at each pruning step
            criterion = self.config.build_importance(seed=self.config.seed + len(self.events_done), for_recovery=False)
            return criterion.score(self.model, None)
        if self._score_steps == 0:
            raise ValueError(f"no training step has been scored yet with {self.config.criterion!r}")
        return {k: v.clone() for k, v in self._scores.items()}

    def _accumulate(self, flat: torch.Tensor) -> None:
        offset = 0
        for key, gate in self.masks.gates.items():
            part = flat[offset:offset + gate.numel()].detach().cpu()
            offset += gate.numel()
            self._scores[key] = self._scores[key] + part if key in self._scores else part.clone()
        self._score_steps += 1

    # -- masked weights ------------------------------------------------------------------------

    def _build_zero_targets(self) -> None:
        """(parameter, dim, indices) slices that belong to masked heads and neurons (key/value rows only of the
        groups all of whose heads are masked)."""
        self._zero_targets = removed_slices(self.model, self.masks.gates, self.masks.spec)

    def _zero_masked_weights(self) -> None:
        fill_slices_(self._zero_targets, 0.0, self.model)  # FSDP2: into each rank's own shard

    # -- state ---------------------------------------------------------------------------------

    def _find_state(self, args, state) -> dict:
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"resuming at step {state.global_step}, but the pruning state {path} is missing; call "
                "callback.load_state(<checkpoint dir>) before trainer.train(resume_from_checkpoint=...) when the "
                "checkpoint is not in output_dir")
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def _restore(self, saved: dict) -> None:
        if saved.get("format") != STATE_FORMAT:
            raise ValueError(f"pruning state format {saved.get('format')!r} is not {STATE_FORMAT}")
        if saved["config"] != self.config.to_dict() or saved["schedule"] != self._resolved.to_dict():
            logger.warning("hfprune: the checkpoint's pruning config or schedule differs from this callback's; "
                           "continuing with this callback's")
        self.events_done = [int(t) for t in saved["events_done"]]
        self._score_steps = int(saved["score_steps"])
        keys = {_key_str(k): k for k in self.masks.gates}
        self._scores = {keys[k]: torch.tensor(v, dtype=torch.float32) for k, v in saved["scores"].items()}
        if saved.get("plan") is not None:
            self.masks.set_plan(PrunePlan.from_dict(saved["plan"]))
        self._build_zero_targets()

    def _refresh(self) -> None:
        plan = self.masks.to_plan()
        after = cost.estimate(self.model, plan, seq_len=self.config.seq_len)
        kept = self.masks.kept()
        fraction = fraction_at(self._resolved, max(self.events_done, default=-1)) if self.events_done else 0.0
        self._summary = {
            "prune/fraction": round(fraction, 6),
            "prune/macs_ratio": after.macs / max(self._dense.macs, 1),
            "prune/params_ratio": after.params / max(self._dense.params, 1),
            "prune/heads": kept.get("heads", 0),
            "prune/neurons": kept.get("neurons", 0),
        }


def put_first(trainer, callback: PruningCallback) -> None:
    """Move ``callback`` ahead of the Trainer's reporting integrations, so its metrics reach TensorBoard/W&B."""
    callbacks = trainer.callback_handler.callbacks
    if callback in callbacks:
        callbacks.remove(callback)
    callbacks.insert(0, callback)


# -- helpers ----------------------------------------------------------------------------------


def _key_str(key: tuple) -> str:
    return "/".join(str(k) for k in key)


def _write_json(path: str, data: dict) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".hfprune-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


__all__ = ["STATE_FILE", "PruningCallback", "put_first"]
