# Copyright hfprune contributors. Apache-2.0.
"""Recipes: one YAML file per workflow (model, data, pruning, distillation, training, evaluation, output, hub).

Strict on input: an unknown key or a value of the wrong type is an error that names the key and lists the
allowed ones. Sections that configure a library object are checked against that object's own dataclass fields
(``pruning`` -> :class:`~hfprune.PruningConfig`, ``schedule`` -> ``ScheduleConfig``, ``distillation`` ->
``DistillationConfig``, ``training`` -> ``transformers.TrainingArguments``), so a recipe can never drift from
the code; the sections hfprune defines itself are the dataclasses of :mod:`hfprune.pipeline.specs`, and
``model.task`` names a registered task (:mod:`hfprune.pipeline.tasks`). Command-line overrides use dotted keys:
``--pruning.macs_ratio=0.5 --hub.push=true``.

Relative paths in a recipe file (``model.path``, ``data.files``, the loader's path arguments in ``data.kwargs``)
are relative to the file's folder, so a recipe runs from any directory (:mod:`hfprune.pipeline.recipe_paths`); a
``package.module:function`` next to it imports from there. Paths given as overrides, in a dict recipe, and
``output.dir`` stay relative to the current directory.

Example:

```python
>>> from hfprune.pipeline.recipe import load_recipe
>>> recipe = load_recipe(None, ["--pruning.macs_ratio=0.5"])  # the embedded default recipe
>>> recipe.pruning.macs_ratio, recipe.method
(0.5, 'oneshot')
```
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from .recipe_paths import resolve_paths
from .specs import DataSpec, EvalSpec, FinetuneSpec, HubSpec, ModelSpec, OutputSpec
from .tasks import TASKS

METHODS = ("oneshot", "gradual")


class RecipeError(ValueError):
    """A recipe (or an override) that cannot run; the message names the key and what is allowed."""


# ---- The recipe ----------------------------------------------------------------------------------------------


def _pruning_cls():
    from ..pruning.config import PruningConfig

    return PruningConfig


def _schedule_cls():
    from ..pruning.schedule import ScheduleConfig

    return ScheduleConfig


def _distillation_cls():
    try:
        from ..distill import DistillationConfig
    except ImportError:
        from ..pruning.config import DistillationConfig
    return DistillationConfig


def _training_cls():
    from transformers import TrainingArguments

    return TrainingArguments


# name -> (class provider, build the object at validation time?). TrainingArguments is only type-checked here
# (it is built at run time, with the output directory); every other section is built, running its checks.
SECTIONS = {
    "model": (lambda: ModelSpec, True),
    "data": (lambda: DataSpec, True),
    "finetune": (lambda: FinetuneSpec, True),
    "pruning": (_pruning_cls, True),
    "schedule": (_schedule_cls, True),
    "distillation": (_distillation_cls, True),
    "training": (_training_cls, False),
    "evaluation": (lambda: EvalSpec, True),
    "output": (lambda: OutputSpec, True),
    "hub": (lambda: HubSpec, True),
}
SCALARS = {"name": str, "description": str, "seed": int, "method": str}
# TrainingArguments is only built at run time; these mistakes would otherwise surface after the model is loaded
TRAINING_RANGES = {
    "learning_rate": (lambda v: v >= 0, ">= 0"),
    "num_train_epochs": (lambda v: v > 0, "> 0"),
    "max_steps": (lambda v: v == -1 or v >= 1, "-1 (use num_train_epochs) or >= 1"),
    "per_device_train_batch_size": (lambda v: v >= 1, ">= 1"),
    "per_device_eval_batch_size": (lambda v: v >= 1, ">= 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, ">= 1"),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
}
TOP_LEVEL = tuple(SCALARS) + tuple(SECTIONS)


@dataclass
class Recipe:
    """A validated recipe: ``raw`` is the resolved dict (defaults not filled in, paths as written), the rest are
    built sections (relative paths of a recipe file resolved against ``root``, the file's folder; ``None`` for a
    dict or the default recipe: the current directory)."""

    raw: dict
    name: str
    method: str
    seed: int
    model: ModelSpec
    data: DataSpec
    pruning: typing.Any
    evaluation: EvalSpec
    output: OutputSpec
    hub: HubSpec
    finetune: FinetuneSpec | None = None
    schedule: typing.Any = None
    distillation: typing.Any = None
    training: dict | None = None
    source: str | None = None
    root: Path | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.output.dir or Path("outputs") / self.name)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


DEFAULT_RECIPE_YAML = """\
# The default recipe (`hfprune run` with no arguments): retraining-free pruning of all-MiniLM-L6-v2 fine-tuned
# on movie-review sentiment, to 60% of the transformer layers' MACs, scored with Fisher information. The fine-tune
# is one short pass (150 steps of 32 sentences, about 2 minutes on 2 CPU cores), cached for the next run; the
# benchmarks' classifier trains 2 epochs (`--finetune.training=null --finetune.teacher=movie_review`).
name: minilm-movie-oneshot
description: MiniLM movie-review sentiment, one-shot Fisher pruning to 60% MACs
method: oneshot
seed: 0
model:
  path: asset:minilm
  base_model: sentence-transformers/all-MiniLM-L6-v2
  task: text-classification
  num_labels: 2
finetune:
  training:
    max_steps: 150
    per_device_train_batch_size: 32
    learning_rate: 1.0e-4
    warmup_steps: 0.1
    weight_decay: 0.01
    logging_steps: 50
data:
  loader: movie_reviews
  max_length: 64
  calibration_samples: 256
  eval_split: test
pruning:
  criterion: fisher
  macs_ratio: 0.6
  seq_len: 64
evaluation:
  metrics: [accuracy, f1]
  latency_batch_size: 32
  latency_seq_len: 64
output:
  dir: outputs/minilm-movie-oneshot
"""


def load_recipe(source: str | Path | dict | None = None, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read (a path, a YAML string, a dict, or ``None`` for the default recipe), apply overrides, validate."""
    label, root = "<default recipe>", None
    if isinstance(overrides, (str, bytes)) or not all(isinstance(o, str) for o in overrides):
        raise RecipeError(f"overrides={overrides!r}: give a list of strings like ['--pruning.macs_ratio=0.5']")
    if source is None:
        raw = yaml.safe_load(DEFAULT_RECIPE_YAML)
    elif isinstance(source, dict):
        raw, label = copy.deepcopy(source), "<dict>"
    elif not isinstance(source, (str, Path)):
        raise RecipeError(f"recipe source {source!r}: give a path to a YAML file, a dict, or None (the default)")
    else:
        path = Path(source)
        if not path.is_file():
            raise RecipeError(f"recipe {str(source)!r} " + ("is a directory; give its .yaml file" if path.is_dir()
                                                            else "not found"))
        label, root = str(path), Path(os.path.abspath(path)).parent  # abspath, not resolve: a symlink's folder
        try:
            raw = yaml.load(path.read_text(), Loader=_StrictLoader)
        except yaml.YAMLError as err:
            raise RecipeError(f"{label}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{label}: a recipe is a mapping of sections, got {type(raw).__name__}")
    parsed = parse_overrides(overrides)
    for key, value in parsed:
        set_dotted(raw, key, value)
    try:
        recipe = validate(raw)
    except RecipeError as err:
        raise RecipeError(f"{label}: {err}") from None
    recipe.source = None if source is None or isinstance(source, dict) else str(source)
    if root is not None:
        resolve_paths(recipe, root, overridden=[key for key, _ in parsed])
    return recipe


def validate(raw: dict) -> Recipe:
    """Check every key and type, build the sections, and check how they fit together."""
    _reject_unknown("recipe", raw, TOP_LEVEL)
    for key, kind in SCALARS.items():
        if key in raw and (not isinstance(raw[key], kind) or isinstance(raw[key], bool)):
            raise RecipeError(f"{key}: expected {kind.__name__}, got {raw[key]!r}")
    if "name" not in raw:
        raise RecipeError("a recipe needs a `name` (it names the output directory)")
    name = raw["name"]
    if not name.strip() or name.strip() in (".", "..") or "/" in name or "\\" in name:
        raise RecipeError(f"name={name!r}: the name is a directory name (outputs/<name>); give a non-empty one "
                          "without slashes")
    method = raw.get("method", "oneshot")
    if method not in METHODS:
        raise RecipeError(f"method={method!r}; choose one of {METHODS}")
    if "pruning" not in raw:
        raise RecipeError("a recipe needs a `pruning` section (PruningConfig fields)")
    built = {name: _build_section(name, raw[name]) for name in SECTIONS if name in raw}
    for name in ("model", "data", "evaluation", "output", "hub"):
        built.setdefault(name, SECTIONS[name][0]()())
    if method == "oneshot":
        misplaced = [k for k in ("schedule", "distillation", "training") if k in raw]
        if misplaced:
            raise RecipeError(f"{misplaced} only apply to method: gradual (this recipe is oneshot)")
    elif "training" not in raw:
        raise RecipeError("method: gradual needs a `training` section (TrainingArguments fields)")
    if built["model"].task not in TASKS:  # the registry, read now: a task registered after import counts
        raise RecipeError(f"model.task={built['model'].task!r}; choose one of {tuple(TASKS)}")
    if "finetune" in raw and raw["finetune"].get("training") is not None:
        _build_section("finetune.training", raw["finetune"]["training"], _training_cls, build=False)
        if built["data"].loader == "none":
            raise RecipeError("finetune.training trains on the data's train split, but data.loader is 'none'")
    return Recipe(raw=raw, name=raw["name"], method=method, seed=raw.get("seed", 0), **built)


def _build_section(name: str, value, provider=None, build: bool | None = None):
    provider_, build_default = SECTIONS.get(name, (provider, False))
    provider, build = provider or provider_, build_default if build is None else build
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise RecipeError(f"{name}: expected a mapping of keys, got {value!r}")
    try:
        cls = provider()
    except ImportError as err:
        raise RecipeError(f"section `{name}` needs a part of hfprune that is not available here: {err}") from None
    allowed = [f.name for f in dataclasses.fields(cls) if f.init]
    _reject_unknown(name, value, allowed)
    hints = typing.get_type_hints(cls)
    for key, item in list(value.items()):
        item = value[key] = _coerce_float(item, hints.get(key, typing.Any))
        if not _matches(item, hints.get(key, typing.Any)):
            raise RecipeError(f"{name}.{key}: expected {_type_name(hints[key])}, got {item!r}")
    if name == "training" and "output_dir" in value:
        raise RecipeError("training.output_dir: set output.dir instead (training runs write below it)")
    if name.endswith("training"):
        for key, (ok, allowed) in TRAINING_RANGES.items():
            if key in value and isinstance(value[key], (int, float)) and not ok(value[key]):
                raise RecipeError(f"{name}.{key}={value[key]!r} must be {allowed}")
    if not build:
        return dict(value)
    # Not transformers' HfArgumentParser(cls).parse_dict: it checks no types (trust_remote_code: "no" would pass,
    # and be truthy), builds the object before looking at unknown keys (a misspelt budget reads "give exactly one
    # budget"), names no section and suggests nothing, and fails on a bare `list` field (EvalSpec.metrics). After
    # the checks above it would only call cls(**value), at the price of importing transformers and of rewriting
    # the dataclass's Field.type objects (it narrows `float | None` to `float` in place).
    try:
        return cls(**value)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"{name}: {err}") from None


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (YAML keeps the last one
    silently, so the first value, often the one the author meant, would be ignored)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # the safe loader's own error names it
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _reject_unknown(where: str, value: dict, allowed) -> None:
    for key in value:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            shown = ", ".join(sorted(allowed)) if len(allowed) <= 30 else f"{len(allowed)} fields of the dataclass"
            raise RecipeError(f"unknown key {where}.{key}{hint}; allowed: {shown}" if where != "recipe"
                              else f"unknown key {key!r}{hint}; allowed: {shown}")


def _matches(value, annotation) -> bool:
    """Whether a YAML value fits a dataclass field's annotation (ints pass for floats; enums take their values)."""
    if annotation is typing.Any or annotation is object:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if origin in (list, tuple, set, typing.Sequence):
        args = typing.get_args(annotation)
        return isinstance(value, list) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if isinstance(annotation, type):
        if issubclass(annotation, enum.Enum):
            return value in {m.value for m in annotation} or isinstance(value, annotation)
        if annotation is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if annotation is int:
            return isinstance(value, int) and not isinstance(value, bool)
        if annotation in (list, tuple):
            return isinstance(value, list)
        return isinstance(value, annotation)
    return True  # an annotation we cannot check (callables, classes): the constructor will


def _coerce_float(value, annotation):
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; where only a number fits, read it as the float it means."""
    if isinstance(value, str) and _matches(1.0, annotation) and not _matches(value, annotation):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


# ---- Overrides ------------------------------------------------------------------------------------------------


def parse_overrides(args: typing.Sequence[str]) -> list:
    """``["--pruning.macs_ratio=0.5", "--hub.push", "true"]`` -> ``[("pruning.macs_ratio", 0.5), ...]``.

    Values are read as YAML scalars/lists (``0.5`` is a float, ``true`` a bool, ``null`` None, ``[a, b]`` a list).
    """
    out, i = [], 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise RecipeError(f"override {arg!r}: expected --section.key=value")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, text = arg[2:], args[i + 1]
            i += 1
        else:
            raise RecipeError(f"override {arg!r} has no value; write {arg}=VALUE")
        try:
            value = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError:
            value = text
        out.append((key, value))
        i += 1
    return out


def set_dotted(raw: dict, key: str, value) -> None:
    """Set ``raw["a"]["b"] = value`` for ``key="a.b"``, creating sections as needed."""
    parts = key.split(".")
    if any(not p for p in parts):
        raise RecipeError(f"override key {key!r} is malformed")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"override {key!r}: {'.'.join(parts[:i + 1])} is {child!r}, not a section")
        node = child
    node[parts[-1]] = value


def recipe_files(root: str | Path = "recipes") -> list:
    """Every recipe under ``root`` (``recipes/<model>/<task>/<variant>.yaml``), sorted."""
    return sorted(p for p in Path(root).rglob("*.y*ml") if p.suffix in (".yaml", ".yml"))
