"""DeepSpeed ZeRO-3 partitions a tiny BERT across 2 gloo processes; PruningCallback must refuse it before changing
anything. Prints ``refused <rank>`` per rank. Needs ``pip install deepspeed`` (it runs on CPU with gloo).

Usage (what tests/test_fsdp2.py runs when deepspeed is installed):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 --master_port 29571 tests/scripts/zero3_refused.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerControl, TrainerState  # noqa: E402

from hfprune import PruningConfig  # noqa: E402
from hfprune.pruning.callback import PruningCallback  # noqa: E402
from hfprune.pruning.schedule import ScheduleConfig  # noqa: E402
from tests.scripts.mp_train import tiny_bert  # noqa: E402

deepspeed.init_distributed(dist_backend="gloo")
model = tiny_bert(0)
config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
assert engine.module.bert.encoder.layer[0].attention.self.query.weight.shape == (0,)  # partitioned away
callback = PruningCallback(PruningConfig(criterion="magnitude", macs_ratio=0.5), ScheduleConfig(kind="oneshot"))
state = TrainerState()
state.max_steps = 4
try:
    callback.on_train_begin(type("Args", (), {})(), state, TrainerControl(), model=engine.module)
except NotImplementedError as err:
    assert "Supported:" in str(err) and callback.masks is None
    print(f"refused {torch.distributed.get_rank()}", flush=True)
