# Copyright hfprune contributors. Apache-2.0.
"""What a serving engine must build for an hfprune checkpoint: each decoder layer's query heads, key/value heads
and FFN width, read from the plan and checked against ``config.json`` and the weights' shapes before anything is
built. Needs no serving engine (torch, transformers and safetensors only), so it is tested without vLLM.

A checkpoint is served only when its three accounts agree: ``prune_plan.json`` against ``config.json`` (the
``hfprune`` record of a per-layer checkpoint, or the widths a plain one states), and both against the tensors in
the safetensors files (read from their headers; no tensor is loaded here).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from ...core import structure
from ...core.checkpoint.load import checkpoint_plan, read_config
from ...core.plan import PrunePlan

# model_type -> what the per-layer decoder is built from (see vllm_models.py); exact match, as the adapters
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
WEIGHTS_INDEX = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"


class UnsupportedCheckpoint(ValueError):
    """A per-layer hfprune checkpoint of a family the serving plugin cannot build."""


class InconsistentCheckpoint(ValueError):
    """A checkpoint whose plan, config and weights disagree (edited, or mixed with another): refused."""


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer as saved: query heads, key/value heads, FFN neurons (0 = the block is gone)."""

    heads: int
    kv_heads: int
    ffn: int

    def __str__(self) -> str:
        return f"{self.heads} query / {self.kv_heads} key-value heads, {self.ffn} FFN neurons"


@dataclass(frozen=True)
class ServingLayout:
    """The layers a serving engine builds for a checkpoint, in order (dropped layers are already gone)."""

    model_type: str
    head_dim: int
    layers: tuple
    heterogeneous: bool

    def describe(self, i: int) -> str:
        return f"layer {i}: {self.layers[i]}"


def is_per_layer(config) -> bool:
    """Whether a config (dict or transformers config) carries hfprune's per-layer record."""
    record = config.get(structure.HFPRUNE_CONFIG_KEY) if isinstance(config, dict) \
        else getattr(config, structure.HFPRUNE_CONFIG_KEY, None)
    return bool(record)


def read_layout(directory: str | Path) -> ServingLayout | None:
    """The checked :class:`ServingLayout` of the checkpoint in ``directory``; ``None`` for a checkpoint hfprune did
    not prune, or a plain one of a family the plugin does not build (it serves as the stock model it is).

    Raises :class:`UnsupportedCheckpoint` for a per-layer checkpoint of another family (naming the supported ones)
    and :class:`InconsistentCheckpoint` naming the layer, block or tensor where plan, config and weights disagree.
    """
    directory = Path(directory)
    config = read_config(directory)
    model_type = config.get("model_type")
    per_layer = is_per_layer(config)
    if model_type not in SUPPORTED_MODEL_TYPES:
        if per_layer:
            raise UnsupportedCheckpoint(
                f"{directory} is a per-layer hfprune checkpoint of model_type {model_type!r}; hfprune's vLLM plugin "
                f"builds per-layer decoders for {', '.join(SUPPORTED_MODEL_TYPES)} only. Serve it with transformers "
                "(hfprune.from_pretrained), or prune it with scope='uniform' for a plain checkpoint")
        return None
    try:
        plan, heterogeneous = checkpoint_plan(directory, config)
    except ValueError as err:
        raise InconsistentCheckpoint(str(err)) from None
    if plan is None:
        return None
    where = f"{directory}"
    layout = _per_layer(config, plan, where) if heterogeneous else _plain(config, plan, where)
    check_weights(directory, layout)
    return layout


def _dense_dims(config: dict) -> tuple:
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    return heads, kv, head_dim, int(config["intermediate_size"])


def _per_layer(config: dict, plan: PrunePlan, where: str) -> ServingLayout:
    # The record's plan is applied to the model config.json builds (as the checkpoint's modeling code does):
    # keep-indices count the kept units; key/value heads are the groups with a kept query head.
    heads, kv, head_dim, ffn = _dense_dims(config)
    if getattr(plan, "hidden", None) is not None and len(plan.hidden) != int(config["hidden_size"]):
        # config.json states the dense hidden size; the checkpoint's code slices it (and folds the RMSNorm epsilon)
        # at load. The plugin builds vLLM's model from the config's global sizes, so it does not do that yet.
        raise UnsupportedCheckpoint(f"{where}: a per-layer checkpoint with a pruned hidden size ({len(plan.hidden)} of "
                                    f"{config['hidden_size']} channels) is not supported by hfprune's vLLM plugin "
                                    "yet; a uniform plan with a pruned hidden size saves a plain checkpoint, which "
                                    "vLLM serves as it is")
    group = heads // kv
    kept = [layer for layer in plan.layers if not layer.drop]
    if len(kept) != int(config["num_hidden_layers"]):
        raise InconsistentCheckpoint(f"{where}: the plan keeps {len(kept)} layers, config.json's num_hidden_layers "
                                     f"is {config['num_hidden_layers']}")
    extra = sorted(set().union(*(layer.blocks for layer in kept)) - {"heads", "ffn"}) if kept else []
    if extra:
        raise InconsistentCheckpoint(f"{where}: the plan prunes blocks {extra}, which a {config['model_type']} "
                                     "decoder does not have")
    shapes = []
    for layer in kept:
        h, f = layer.get("heads"), layer.get("ffn")
        n_heads = heads if h is None else len(h)
        n_kv = kv if h is None else len({i // group for i in h})
        shapes.append(LayerShape(n_heads, n_kv, ffn if f is None else len(f)))
    layout = ServingLayout(config["model_type"], head_dim, tuple(shapes), heterogeneous=True)
    check_per_layer_config(config, layout, where)
    return layout


def check_per_layer_config(config: dict, layout: ServingLayout, where: str) -> None:
    """transformers' ``per_layer_config`` in ``config.json`` (hfprune writes one for a per-layer Llama-family
    checkpoint) must state the sizes the plan leaves; absent keys keep the global value."""
    overrides = config.get("per_layer_config")
    if not overrides:
        return
    by_index = {int(k): v for k, v in overrides.items()}
    heads, kv, _, ffn = _dense_dims(config)
    for i, shape in enumerate(layout.layers):
        entry = by_index.get(i, {})
        skip = set(entry.get("skip") or ())
        stated = LayerShape(0 if "attention" in skip else entry.get("num_attention_heads", heads),
                            0 if "attention" in skip else entry.get("num_key_value_heads", kv),
                            0 if "mlp" in skip else entry.get("intermediate_size", ffn))
        if stated != shape:
            raise InconsistentCheckpoint(f"{where}: config.json's per_layer_config states {stated} for layer {i}, "
                                         f"the plan leaves {shape}. Refusing to serve an edited checkpoint")


def _plain(config: dict, plan: PrunePlan, where: str) -> ServingLayout:
    heads, kv, head_dim, ffn = _dense_dims(config)
    kept_layers = [layer for layer in plan.layers if not layer.drop]
    if len(kept_layers) != int(config["num_hidden_layers"]):
        raise InconsistentCheckpoint(f"{where}: prune_plan.json keeps {len(kept_layers)} layers, config.json's "
                                     f"num_hidden_layers is {config['num_hidden_layers']}")
    kept = plan.kept_dims()
    for i, layer in ((i, layer) for i, layer in enumerate(plan.layers) if not layer.drop):
        if kept is not None:
            want = kept["layers"][i]
            pairs = {"heads": (tuple(want.get("heads", (heads, kv))), (heads, kv)),
                     "ffn": (tuple(want.get("ffn", (ffn,))), (ffn,))}
        else:  # an older plan without the dense sizes: the kept counts are all it states
            h, f = layer.get("heads"), layer.get("ffn")
            pairs = {"heads": ((len(h),) if h is not None else (heads,), (heads,)),
                     "ffn": ((len(f),) if f is not None else (ffn,), (ffn,))}
        for name, (plan_dims, config_dims) in pairs.items():
            if plan_dims != config_dims:
                raise InconsistentCheckpoint(
                    f"{where}: layers[{i}].{name}: prune_plan.json leaves {list(plan_dims)}, config.json states "
                    f"{list(config_dims)} (was config.json or prune_plan.json edited?)")
    shapes = tuple(LayerShape(heads, kv, ffn) for _ in kept_layers)
    return ServingLayout(config["model_type"], head_dim, shapes, heterogeneous=False)


def weight_shapes(directory: Path) -> dict:
    """``{tensor name: shape}`` from the safetensors headers (one file, or the shards the index names)."""
    index = directory / WEIGHTS_INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    else:
        raise InconsistentCheckpoint(f"{directory} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX}")
    shapes = {}
    for name in files:
        with safe_open(str(directory / name), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def expected_shapes(layout: ServingLayout, hidden: int, i: int) -> dict:
    """Shapes of layer ``i``'s projection weights, by their name inside the layer (absent blocks: no entry)."""
    s, hd = layout.layers[i], layout.head_dim
    out = {}
    if s.heads:
        out.update({"self_attn.q_proj.weight": (s.heads * hd, hidden), "self_attn.k_proj.weight": (s.kv_heads * hd,
                    hidden), "self_attn.v_proj.weight": (s.kv_heads * hd, hidden),
                    "self_attn.o_proj.weight": (hidden, s.heads * hd)})
    out.update({"mlp.gate_proj.weight": (s.ffn, hidden), "mlp.up_proj.weight": (s.ffn, hidden),
                "mlp.down_proj.weight": (hidden, s.ffn)})
    return out


def check_weights(directory: Path, layout: ServingLayout, hidden: int | None = None) -> None:
    """Raise :class:`InconsistentCheckpoint` naming the first tensor whose shape is not what ``layout`` builds, a
    projection the layout needs that is missing, or a tensor of a layer the layout does not have."""
    shapes = weight_shapes(directory)
    if hidden is None:
        hidden = int(read_config(directory)["hidden_size"])
    prefix = "model.layers."
    n = len(layout.layers)
    for key in shapes:
        if key.startswith(prefix) and int(key[len(prefix):].split(".", 1)[0]) >= n:
            raise InconsistentCheckpoint(f"{directory}: tensor {key} belongs to a layer the plan does not keep "
                                         f"(it keeps {n})")
    for i in range(n):
        for name, want in expected_shapes(layout, hidden, i).items():
            key = f"{prefix}{i}.{name}"
            if want[0] * want[1] == 0 and key not in shapes:
                continue  # a block with no unit left may be saved without its zero-size tensors
            got = shapes.get(key)
            if got != want:
                raise InconsistentCheckpoint(
                    f"{directory}: {key} has shape {list(got) if got else 'missing'}, the plan and config.json make "
                    f"it {list(want)} ({layout.describe(i)}). Refusing to "
                    "serve an edited or mixed checkpoint")
        if layout.layers[i].heads == 0:
            stray = [k for k in shapes if k.startswith(f"{prefix}{i}.self_attn.") and k.endswith("_proj.weight")]
            if stray:
                raise InconsistentCheckpoint(f"{directory}: layer {i} has no head left in the plan, but the weights "
                                             f"hold {stray[0]}")
