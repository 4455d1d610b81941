# Copyright hfprune contributors. Apache-2.0.
"""The pushes a ``Trainer`` makes while it trains a pruned model carry the model's plan and modeling code.

``Trainer.push_to_hub()`` saves into ``output_dir`` (through the pruned model's own ``save_pretrained``, which writes
``prune_plan.json`` and, for a per-layer plan, ``modeling_hfprune.py``) and uploads the folder: nothing is missing.
The pushes while training (``push_to_hub=True``; ``hub_strategy`` ``every_save``, the default, or ``checkpoint``)
save into ``checkpoint-N`` instead, and transformers copies only the config, the weights and their index from there
into ``output_dir`` before uploading it. The repo then holds a config whose ``auto_map`` names code it lacks
(``trust_remote_code`` loading fails) and no plan. :class:`PrunedPushCallback` copies the two files along.

Example:

```python
>>> import transformers, hfprune
>>> args = transformers.TrainingArguments("out", push_to_hub=True, hub_model_id="me/pruned-tuned", save_steps=500)
>>> trainer = transformers.Trainer(model=pruned_model, args=args, train_dataset=rows,
...                                callbacks=[hfprune.PrunedPushCallback()])  # doctest: +SKIP
```
"""

from __future__ import annotations

import logging
import os
import shutil

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..structure import ENGINE_FILES, MODELING_FILE, PLAN_FILE

logger = logging.getLogger("hfprune")

# what a pruned model's save adds to transformers' files, and transformers' push from a checkpoint leaves behind
PRUNED_FILES = (PLAN_FILE, MODELING_FILE, *ENGINE_FILES.values())


class PrunedPushCallback(TrainerCallback):
    """Before each push the ``Trainer`` makes from a checkpoint, copy the checkpoint's ``prune_plan.json`` and
    ``modeling_hfprune.py`` into ``output_dir``, which the push uploads beside the config and weights transformers
    copies itself. Add it to a ``Trainer`` that trains a pruned model with ``push_to_hub=True``; on a model without
    those files (a dense one, or one still masked by :class:`~hfprune.PruningCallback`) it does nothing.

    Only the main process copies; a push of the end of training (``trainer.push_to_hub()``) needs nothing from it,
    but is harmless: the save it makes afterwards rewrites both files.
    """

    def on_push_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(checkpoint):
            return  # a push with no checkpoint of this step (trainer.push_to_hub() saves into output_dir itself)
        copied = []
        for name in PRUNED_FILES:
            source = os.path.join(checkpoint, name)
            if os.path.isfile(source):
                shutil.copyfile(source, os.path.join(args.output_dir, name))
                copied.append(name)
        if copied:
            logger.info("pushing %s from %s with the pruned model's files", ", ".join(copied), checkpoint)
