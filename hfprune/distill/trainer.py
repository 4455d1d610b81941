# Copyright hfprune contributors. Apache-2.0.
"""``DistillationTrainer``: the stock Trainer with a teacher. The loss math lives in :mod:`.losses`.

Normalisation. Each loss term is a sum over items (examples, or non-padding tokens for token-level heads)
divided by the number of items of the whole optimizer step: all micro-batches of the gradient accumulation and,
with ``average_tokens_across_devices`` (the default), all ranks. Counts come from the step's batches
(``get_batch_samples``). Under DDP each rank's loss is multiplied by the world size once, because DDP then
*averages* gradients: the result is the gradient of the global mean, the same as one process on the same
global batch. The model's own task loss is a per-micro-batch mean; it is turned back into a sum with its label
count, so it is normalised the same way. ``loss_is_scaled_for_ga`` tells the Trainer not to divide again.
"""

from __future__ import annotations

import copy
import os
import tempfile

import torch
from transformers import Trainer
from transformers.utils import logging

from ..core.apply import unwrap
from ..core.sharded import check_supported_sharding
from .causal import causal_logits_term, causal_token_count, check_setup, is_causal_lm, split_teacher_batch
from .config import DistillationConfig
from .logits_store import ROW_KEY, TeacherLogitsCollator, TeacherLogitsDataset
from .losses import (
    causal_token_mask,
    combine_losses,
    default_layer_map,
    hidden_mse_loss,
    kl_distill_loss,
    logits_mse_loss,
    make_projections,
    prediction_mse_loss,
    teacher_topk,
    topk_kl_distill_loss,
)

logger = logging.get_logger(__name__)

PROJECTION_FILE = "hfprune_distill_projection.safetensors"


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss mixes the task loss with distillation from a frozen teacher.

    Args:
        teacher: the teacher model; ``None`` distils from a frozen copy of the model as it is when the trainer is
            built (self-distillation: the dense model before a :class:`~hfprune.pruning.callback.PruningCallback`
            prunes it).
        distill_config: :class:`DistillationConfig` (default: ``T=2``, ``alpha=0.5``, no hidden-state term).
        teacher_logits: a folder written by :func:`~hfprune.distill.logits_store.precompute_teacher_logits` on the
            same ``train_dataset`` (with ``teacher=None``): train from the teacher's top-k logits on disk, without
            the teacher in memory. Needs ``top_k`` and the temperature they were written with.
        *args, **kwargs: passed to ``Trainer``.

    Causal LMs (see ``DistillationConfig.causal``) count the positions that predict a token, shifted like their
    loss, in every term; see :mod:`hfprune.distill.causal`.

    The teacher is kept in eval mode without gradients, optionally in another dtype or on another device; it is
    not part of the model, so checkpoints and ``save_model()`` hold the student only. Learned projections for
    the hidden-state term (student and teacher widths differ) are trained with the student's optimizer and
    saved beside the checkpoint (``hfprune_distill_projection.safetensors``) for resuming, never in the student.

    Example:

    ```python
    >>> from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
    >>> from hfprune.distill import DistillationConfig, DistillationTrainer
    >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
    ...                                                  num_attention_heads=4, intermediate_size=64))
    >>> trainer = DistillationTrainer(model=model, args=TrainingArguments("out", report_to=[], use_cpu=True),
    ...                               teacher=None, distill_config=DistillationConfig(alpha=0.9))
    >>> trainer.teacher.training, any(p.requires_grad for p in trainer.teacher.parameters())
    (False, False)
    ```
    """

    loss_is_scaled_for_ga = True  # compute_loss normalises over the whole accumulated step itself

    def __init__(self, *args, teacher=None, distill_config: DistillationConfig | None = None, teacher_logits=None,
                 **kwargs):
        if distill_config is None:
            distill_config = DistillationConfig()
        if not isinstance(distill_config, DistillationConfig):  # before Trainer.__init__ changes model and disk
            raise TypeError(f"distill_config must be a DistillationConfig, got {type(distill_config).__name__}")
        if teacher is not None and not isinstance(teacher, torch.nn.Module):
            raise TypeError(f"teacher must be a model (torch.nn.Module) or None, got {type(teacher).__name__}")
        store = check_setup(kwargs.get("model", args[0] if args else None), teacher, teacher_logits, distill_config,
                            kwargs.get("train_dataset", args[3] if len(args) > 3 else None))
        super().__init__(*args, **kwargs)
        check_supported_sharding(self.model, self.args)  # ZeRO-3: a teacher copied from partitioned weights is empty
        self.distill_config = distill_config
        student = unwrap(self.model)
        cfg = distill_config
        # causal LMs: logits shifted like their loss, and the task-loss items counted the same way
        self._loss_shifts_labels = is_causal_lm(student) if cfg.causal is None else cfg.causal
        self.teacher_logits = store
        if store is not None:  # precomputed top-k: no teacher in memory; each row brings its own from disk
            self.teacher = None
            if self.train_dataset is not None:
                self.train_dataset = TeacherLogitsDataset(self.train_dataset, store)
            self.data_collator = TeacherLogitsCollator(self.data_collator, store)
        else:
            if teacher is None:
                teacher = copy.deepcopy(student)  # the model as given: dense, before any pruning during training
            device = torch.device(cfg.teacher_device) if cfg.teacher_device else self.args.device
            dtype = getattr(torch, cfg.teacher_dtype) if cfg.teacher_dtype else None
            self.teacher = teacher.to(device=device, dtype=dtype) if dtype else teacher.to(device)
            self.teacher.requires_grad_(False)
            self.teacher.eval()
        self.layer_map = None
        self.projections = torch.nn.ModuleDict()
        if cfg.hidden_weight > 0:
            s_layers, s_width = _layers_and_width(student)
            t_layers, t_width = _layers_and_width(unwrap(self.teacher))
            self.layer_map = dict(cfg.layer_map) if cfg.layer_map else default_layer_map(s_layers, t_layers)
            gen = torch.Generator().manual_seed(self.args.seed)  # identical on every rank
            self.projections = make_projections(self.layer_map, s_width, t_width, gen).to(self.args.device)
        self._step_totals = None
        # Callbacks that put metrics into the logs (PruningCallback sets ``logs_metrics_first``) go ahead of the
        # reporting integrations, which would otherwise send the logs before those metrics are in them. An attribute,
        # not an isinstance check: distillation sits beside pruning and does not import it.
        for cb in [c for c in self.callback_handler.callbacks if getattr(c, "logs_metrics_first", False)]:
            self.callback_handler.callbacks.remove(cb)
            self.callback_handler.callbacks.insert(0, cb)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.teacher_logits is not None and ROW_KEY not in self._signature_columns:
            self._signature_columns.append(ROW_KEY)  # kept for TeacherLogitsCollator, which removes it

    # -- optimizer: the projections train with the student ------------------------------------------

    def create_optimizer(self, model=None):
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh and len(self.projections):
            # Under FSDP, accelerate's prepare maps each optimizer parameter to the model's shard of it and knows
            # only the model's: the projections (outside the model) join after it, in create_scheduler.
            self._projections_pending = True
            if not self.is_fsdp_enabled:
                self._add_projections(optimizer)
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if getattr(self, "_projections_pending", False):
            self._add_projections(optimizer if optimizer is not None else self.optimizer)
        return super().create_scheduler(num_training_steps, optimizer)

    def _add_projections(self, optimizer) -> None:
        self._projections_pending = False
        raw = getattr(optimizer, "optimizer", optimizer)
        raw.add_param_group({"params": list(self.projections.parameters()), "weight_decay": 0.0})
        raw.register_step_pre_hook(lambda *_: self._sync_projection_grads())

    def _sync_projection_grads(self) -> None:
        # The projections are outside the DDP module, so DDP does not average their gradients: do it here.
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        for p in self.projections.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
                p.grad.div_(world)

    # -- item counts of the whole step ------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        totals = torch.zeros(3, dtype=torch.float64)
        for batch in batch_samples:
            totals += torch.tensor(self._local_counts(batch), dtype=torch.float64)
        factor = 1
        if self.args.world_size > 1 and self.args.average_tokens_across_devices:
            totals = self.accelerator.gather(totals.to(device)).reshape(-1, 3).sum(0).cpu()
            factor = self.args.world_size
        self._step_totals = (totals.tolist(), factor, len(batch_samples))
        return batch_samples, num_items

    def _local_counts(self, batch) -> list:
        """[examples, tokens (-1: unknown), task-loss items] of one micro-batch."""
        examples = _batch_size(batch)
        mask = batch.get("attention_mask")
        ids = batch.get("input_ids")
        tokens = float(mask.sum()) if mask is not None else float(ids.numel()) if ids is not None else -1.0
        if getattr(self, "_loss_shifts_labels", False):
            tokens = causal_token_count(batch)  # the shifted positions, as the loss counts them
        labels = batch.get("labels")
        if isinstance(labels, torch.Tensor):
            counted = labels[..., 1:] if getattr(self, "_loss_shifts_labels", False) else labels
            task = float(counted.ne(-100).sum())
        else:
            task = float(examples)
        return [float(examples), tokens, task]

    def _denominators(self, inputs, training: bool) -> tuple:
        """Per item kind, what this micro-batch's sums are divided by, and its local counts."""
        local = self._local_counts(inputs)
        if not training or self._step_totals is None:
            return local, local
        totals, factor, micro = self._step_totals
        denoms = []
        for total, here in zip(totals, local):
            # unknown counts: fall back to the mean of micro-batch means, as the Trainer does
            denoms.append(total / factor if total >= 0 and here >= 0 else max(here, 1.0) * micro / factor)
        return denoms, local

    # -- loss -------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.distill_config
        want_hidden = cfg.hidden_weight > 0
        inputs, precomputed = split_teacher_batch(inputs)
        student_inputs = {**inputs, "output_hidden_states": True} if want_hidden else dict(inputs)
        outputs = model(**student_inputs)
        t_out = None
        if self.teacher is not None:
            if self.teacher.training:
                self.teacher.eval()
            t_device = next(self.teacher.parameters()).device
            teacher_inputs = {k: (v.to(t_device) if isinstance(v, torch.Tensor) else v)
                              for k, v in inputs.items() if k != "labels"}
            if want_hidden:
                teacher_inputs["output_hidden_states"] = True
            with torch.no_grad():
                t_out = self.teacher(**teacher_inputs)
        elif precomputed is None and model.training:
            raise ValueError("a training batch came without its precomputed teacher logits: train on the dataset "
                             "given to DistillationTrainer (it adds them)")

        (n_ex, n_tok, n_task), (l_ex, l_tok, l_task) = self._denominators(inputs, model.training)
        mask = inputs.get("attention_mask")
        task = getattr(outputs, "loss", None)
        if task is not None:
            task = task * (l_task / max(n_task, 1e-12))  # the model's mean -> sum / step count
        distill = None
        if cfg.alpha > 0 and self._loss_shifts_labels and getattr(outputs, "logits", None) is not None:
            if t_out is not None or precomputed is not None:
                distill = causal_logits_term(outputs.logits, t_out, precomputed, inputs, cfg, n_tok)
        elif cfg.alpha > 0:
            distill = self._logits_term(outputs, t_out, inputs, mask, n_ex, n_tok, l_ex)
        if distill is None and cfg.alpha > 0 and task is not None:
            # evaluation without precomputed logits: the task loss alone (the teacher is not in memory)
            return (task, outputs) if return_outputs else task
        hidden = None
        if want_hidden:
            s_h, t_h = getattr(outputs, "hidden_states", None), getattr(t_out, "hidden_states", None)
            if s_h is None or t_h is None:
                raise ValueError("hidden_weight > 0 needs models that return hidden_states")
            t_h = tuple(h.to(s_h[0].device) for h in t_h)
            token_mask = mask if mask is not None and s_h[0].dim() == 3 and mask.shape == s_h[0].shape[:2] else None
            if self._loss_shifts_labels:  # the same items as the logits term: positions that predict a token
                token_mask = causal_token_mask(mask, inputs.get("labels"), s_h[0].shape[:2])
                s_h, t_h = tuple(h[:, :-1] for h in s_h), tuple(h[:, :-1] for h in t_h)
            hidden = hidden_mse_loss(s_h, t_h, self.layer_map, self.projections, token_mask,
                                     n_tok if token_mask is not None else n_ex)
        loss = combine_losses(task, distill, hidden, cfg.alpha, cfg.hidden_weight)
        if return_outputs and want_hidden and not model.training:
            outputs = type(outputs)(**{k: v for k, v in outputs.items() if k != "hidden_states"})
        return (loss, outputs) if return_outputs else loss

    def _logits_term(self, outputs, t_out, inputs, mask, n_ex, n_tok, l_ex):
        cfg = self.distill_config
        logits = getattr(outputs, "logits", None)
        if logits is None:  # forecasting heads: their own distillation loss (a mean over this micro-batch)
            from ..forecast import distribution_kind, forecast_distill_loss

            # The head's distribution family, read from the config: a 2-parameter output alone is ambiguous.
            kind = distribution_kind(unwrap(self.model))
            return forecast_distill_loss(outputs, t_out, inputs, distribution=kind) * (l_ex / max(n_ex, 1e-12))
        t_logits = t_out.logits.to(logits.device)
        problem = getattr(getattr(unwrap(self.model), "config", None), "problem_type", None)
        if problem == "regression" or (problem is None and logits.dim() == 2 and logits.shape[-1] == 1):
            return prediction_mse_loss(logits, t_logits, n_ex)
        token_level = logits.dim() == 3
        token_mask = mask if token_level and mask is not None and mask.shape == logits.shape[:2] else None
        items = n_tok if token_level else n_ex
        if cfg.loss == "mse" or problem == "multi_label_classification":
            return logits_mse_loss(logits, t_logits, token_mask, items)
        if cfg.top_k is not None:
            values, indices, lse = teacher_topk(t_logits, min(cfg.top_k, t_logits.shape[-1]), cfg.temperature)
            return topk_kl_distill_loss(logits, values, indices, lse, cfg.temperature, token_mask, items)
        return kl_distill_loss(logits, t_logits, cfg.temperature, token_mask, items)

    # -- checkpoints: the projections beside the student -------------------------------------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if len(self.projections) and self.args.should_save:
            from safetensors.torch import save_file

            directory = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            fd, tmp = tempfile.mkstemp(dir=directory, suffix=".safetensors")
            os.close(fd)
            try:
                save_file({k: v.detach().cpu().contiguous() for k, v in self.projections.state_dict().items()}, tmp)
                os.replace(tmp, os.path.join(directory, PROJECTION_FILE))
            except BaseException:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, PROJECTION_FILE)
        if len(self.projections) and os.path.isfile(path):
            from safetensors.torch import load_file

            self.projections.load_state_dict(load_file(path, device=str(self.args.device)))
        elif len(self.projections):
            logger.warning(f"hfprune: {path} not found; the hidden-state projections restart from their init")


def _batch_size(batch) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ValueError("a batch needs at least one tensor with a batch dimension")


def _layers_and_width(model) -> tuple:
    config = model.config
    layers = next((getattr(config, n) for n in ("num_hidden_layers", "n_layer", "n_layers", "encoder_layers",
                                                "num_layers") if isinstance(getattr(config, n, None), int)), None)
    width = next((getattr(config, n) for n in ("hidden_size", "d_model", "n_embd", "dim")
                  if isinstance(getattr(config, n, None), int)), None)
    if layers is None or width is None:
        raise ValueError(f"cannot read the layer count / width of {type(model).__name__}; give layer_map explicitly "
                         "and models with hidden_size or d_model")
    return layers, width
