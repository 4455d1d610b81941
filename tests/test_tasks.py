"""Tasks (hfprune/pipeline/tasks.py): the registry, what every registered task provides, the card reading its task
from it, the results and sweep files (artifacts.py), and the task from docs/extending.md run end to end."""

import doctest
import inspect
import json
import re
from pathlib import Path

import pytest
import torch
import transformers as T

from hfprune.pipeline import artifacts, card, report, tasks
from hfprune.pipeline.recipe import RecipeError, load_recipe
from hfprune.pipeline.tasks import TASKS, Task, get_task, register_task

from .test_cli import make_csv, make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
BASE = {"name": "t", "pruning": {"criterion": "magnitude", "macs_ratio": 0.5}}


@pytest.fixture
def registry():
    """The task registry, restored afterwards: tests register tasks of their own."""
    saved = dict(TASKS)
    yield TASKS
    TASKS.clear()
    TASKS.update(saved)


# ---- the registry ----------------------------------------------------------------------------------------------


def test_the_built_in_tasks_are_registered():
    assert list(TASKS) == ["text-classification", "causal-lm", "forecasting"]


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_provides_each_step(name):
    task = get_task(name)
    assert isinstance(task, Task) and task.name == name
    for method in ("collator", "evaluate_batch", "latency_input"):  # the steps Task leaves abstract
        assert getattr(type(task), method) is not getattr(Task, method), f"{name} does not implement {method}"
    assert task.auto_class is None or hasattr(T, task.auto_class), task.auto_class
    assert isinstance(task.card_task_type, str) and task.card_task_type != "other"


def test_an_unknown_task_lists_the_registered_ones(registry):
    with pytest.raises(ValueError, match=re.escape("model.task='translation'; choose one of ('text-classification', "
                                                   "'causal-lm', 'forecasting')")):
        get_task("translation")

    @register_task
    class Translation(tasks.TextTask):
        name = "translation"

    assert isinstance(get_task("translation"), Translation)
    assert load_recipe({**BASE, "model": {"task": "translation"}}).model.task == "translation"
    del registry["translation"]
    with pytest.raises(RecipeError, match=re.escape("model.task='translation'; choose one of ('text-classification', "
                                                    "'causal-lm', 'forecasting')")):
        load_recipe({**BASE, "model": {"task": "translation"}})


def test_register_task_refuses_what_would_be_ambiguous(registry):
    with pytest.raises(ValueError, match="already registered by TextClassificationTask"):
        register_task(type("Other", (tasks.TextTask,), {"name": "text-classification"}))
    with pytest.raises(ValueError, match="needs its own `name`"):
        register_task(type("Unnamed", (tasks.TextClassificationTask,), {}))  # would inherit its parent's name
    with pytest.raises(TypeError, match="a Task subclass"):
        register_task(dict)


def test_forecasting_times_nothing_without_evaluation_rows():
    spec = load_recipe({**BASE, "model": {"task": "forecasting"}}).evaluation
    assert get_task("forecasting").latency_input(None, [], spec, 0) is None
    rows = [{"past_values": torch.arange(12.0).reshape(2, 6, 1), "future_values": torch.zeros(2, 3, 1)}]
    batch = get_task("forecasting").latency_input(None, rows, spec, 0)
    assert batch["past_values"].shape == (spec.latency_batch_size, 6, 1)


# ---- the card reads its task from the registry --------------------------------------------------------------------


def _results(task: str) -> dict:
    return {"task": task, "recipe": "r", "metrics": {"before": {"accuracy": 0.9}, "after": {"accuracy": 0.8}},
            "params": {"after": 10}, "macs": {"after": 5, "seq_len": 8},
            "layers": [{"stack": "layers", "index": 0, "dropped": False, "dense_heads": {"heads": 2},
                        "heads": {"heads": 1}, "dense_neurons": {"ffn": 4}, "neurons": {"ffn": 2}}]}


@pytest.mark.parametrize("name", list(TASKS))
def test_the_card_names_the_tasks_type_and_auto_class(name):
    task = get_task(name)
    data = card.card_data(_results(name))
    assert data.eval_results[0].task_type == task.card_task_type
    assert data.pipeline_tag == task.pipeline_tag
    text = card.card_text(_results(name), None, [], remote_code=False)
    assert f"from transformers import {task.auto_class or 'AutoModel'}\n" in text


def test_a_card_for_a_task_this_version_does_not_know():
    data = card.card_data(_results("summarization"))
    assert data.eval_results[0].task_type == "summarization" and data.pipeline_tag is None
    assert "from transformers import AutoModel\n" in card.card_text(_results("summarization"), None, [])


# ---- artifacts -------------------------------------------------------------------------------------------------


def test_results_round_trip_and_tables(tmp_path):
    results = {**_results("causal-lm"), "params": {"before": 20, "after": 10},
               "macs": {"before": 10, "after": 5, "seq_len": 8}, "eval": {"split": "test"}}
    path = artifacts.write_results(tmp_path, results)
    assert path.name == artifacts.RESULTS_FILE and artifacts.read_results(tmp_path) == results
    assert json.loads(path.read_text()) == results  # a plain JSON object: older and newer files read alike
    table = artifacts.results_table(results)
    assert "| test accuracy | 0.9000 | 0.8000 | |" in table and "| parameters | 20 | 10 | 0.50 |" in table
    assert artifacts.layer_table(results["layers"]).splitlines()[-1] == "| layer 0 | 1 / 2 | 2 / 4 |"


@pytest.mark.parametrize("module", [artifacts, tasks], ids=lambda m: m.__name__)
def test_the_docstring_example_holds(module):
    # the fences of the docstring's markdown code block are not part of the expected output
    text = "\n".join(line for line in module.__doc__.splitlines() if not line.strip().startswith("```"))
    runner = doctest.DocTestRunner()
    runner.run(doctest.DocTestParser().get_doctest(text, {}, module.__name__, module.__file__, 0))
    assert runner.failures == 0 and runner.tries > 0


def test_old_names_still_import_and_the_moved_sweep_says_where_it_went():
    import hfprune.run as old_run

    assert old_run.RESULTS_FILE == "hfprune_results.json" and old_run.results_table is artifacts.results_table
    assert old_run.load_class_from_config is tasks.load_class_from_config
    assert report.layer_table is artifacts.layer_table and report.PLOTS_DIR == "plots"
    with pytest.raises(AttributeError, match="moved from hfprune.run to hfprune.pipeline.sweep"):
        old_run.sweep  # noqa: B018


# ---- the worked example of docs/extending.md -----------------------------------------------------------------


def docs_task_example() -> str:
    text = (ROOT / "docs" / "extending.md").read_text()
    section = text[text.index("## A new task"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_documented_task_runs_end_to_end(registry, tmp_path):
    from hfprune.pipeline.run import load_data, run

    code = docs_task_example()
    cls_lines = [line for line in code.splitlines() if line.strip()]
    assert len(cls_lines) <= 20, "the example is meant to be short"
    namespace = {}
    exec(compile(code, "docs/extending.md", "exec"), namespace)
    assert "text-regression" in TASKS and inspect.isclass(TASKS["text-regression"])

    model_dir = make_tiny_model(tmp_path)  # a 2-label head: replaced by a one-output head with the same body
    config = T.AutoConfig.from_pretrained(model_dir)
    config.num_labels = 1
    torch.manual_seed(0)
    T.BertForSequenceClassification(config).save_pretrained(model_dir)
    recipe = load_recipe({
        "name": "regression", "model": {"path": str(model_dir), "task": "text-regression", "num_labels": 1},
        "data": {"loader": "files", "format": "csv", "files": make_csv(tmp_path), "max_length": 16,
                 "calibration_samples": 16, "calibration_batch_size": 8},
        "pruning": {"criterion": "fisher", "macs_ratio": 0.5},  # fisher: gradients of the regression loss
        "evaluation": {"metrics": ["mse", "mae"], "batch_size": 16, "latency_batch_size": 2, "latency_seq_len": 8,
                       "latency_rounds": 1},
        "output": {"dir": str(tmp_path / "out")}})
    tokenizer = T.AutoTokenizer.from_pretrained(model_dir)
    assert isinstance(load_data(recipe, tokenizer)["train"][0]["labels"], float)
    result = run(recipe)
    assert set(result.results["metrics"]["after"]) == {"mse", "mae"}
    assert result.results["macs"]["after"] <= 0.5 * result.results["macs"]["before"]
    written = artifacts.read_results(tmp_path / "out")
    assert written["task"] == "text-regression"
    front = (tmp_path / "out" / artifacts.CARD_FILE).read_text().split("---")[1]
    assert "pipeline_tag: text-classification" in front and "type: text-classification" in front
