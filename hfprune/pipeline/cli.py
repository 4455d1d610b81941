# Copyright hfprune contributors. Apache-2.0.
"""The ``hfprune`` command (also ``python -m hfprune``, and ``accelerate launch -m hfprune run RECIPE``).

    hfprune run [RECIPE] [--section.key=value ...] [--no-save] [--push]
    hfprune prune --model_dir DIR --output_dir OUT [--macs_ratio 0.6 --criterion fisher ...] [--data movie_reviews]
                  [--data_files FILE ... | --dataset NAME] [--text_column/--label_column/--time_column COLUMN ...]
                  [--sequential | --no-sequential] [--dtype bfloat16] [--offload_dir DIR] [--calibration_samples N]
    hfprune report DIR [--out PLOTS_DIR] [--no-plots]
    hfprune push DIR REPO_ID [--private] [--revision BRANCH] [--create-pr] [--token TOKEN] [--message TEXT]
    hfprune sweep [RECIPE] [--ratios 0.4,0.5,0.6,0.7,0.8] [--budget macs_ratio] [--section.key=value ...]
    hfprune sparsify MODEL_DIR --output DIR [--criterion wanda] [--sparsity 0.5] [--pattern 2:4] [--compact] ...
    hfprune search MODEL_DIR --output DIR --params_ratio 0.8 [--axes depth,hidden,heads,ffn] [--data bbc_news ...]
    hfprune serve DIR [--check-only] [--python PYTHON] [--vllm="VLLM SERVER OPTIONS"]
    hfprune env

``run`` with no recipe runs the embedded default (MiniLM movie-review sentiment, one-shot Fisher pruning to 60%
of the MACs). Errors print one line naming the bad input (set ``HFPRUNE_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .cli_prune_args import DEFAULT_METRICS, OneLineParser, PruneArgs, prune_data

USAGE = __doc__.split("\n\n")[1]


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="[hfprune] %(message)s", stream=sys.stderr)


def _split_run_args(args: list, flags: dict) -> tuple:
    """``[RECIPE] [--flag ...] [--a.b=v ...]`` -> (recipe or None, flag values, override strings)."""
    recipe, values, overrides, i = None, {name: default for name, (default, _) in flags.items()}, [], 0
    while i < len(args):
        arg = args[i]
        name = arg.split("=", 1)[0]
        if name in flags:
            default, takes_value = flags[name]
            if takes_value:
                if "=" in arg:
                    values[name] = arg.split("=", 1)[1]
                elif i + 1 < len(args):
                    values[name], i = args[i + 1], i + 1
                else:
                    raise SystemExit(f"hfprune: error: {name} needs a value")
            else:
                values[name] = True
        elif arg.startswith("--"):
            overrides.append(arg)
            if "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("--"):
                overrides.append(args[i + 1])
                i += 1
        elif recipe is None and not overrides:
            recipe = arg
        else:
            raise SystemExit(f"hfprune: error: unexpected argument {arg!r} (overrides look like --section.key=value)")
        i += 1
    return recipe, values, overrides


def cmd_run(args: list) -> int:
    from .artifacts import CARD_FILE, PLOTS_DIR
    from .recipe import load_recipe
    from .run import run

    recipe_path, flags, overrides = _split_run_args(args, {"--no-save": (False, False), "--push": (False, False)})
    recipe = load_recipe(recipe_path, overrides)
    _setup_logging()
    result = run(recipe, save=not flags["--no-save"], push=True if flags["--push"] else None)
    print(f"\n## {recipe.name}\n")
    print(result.table())
    if result.output_dir is not None:
        print(f"\nSaved to {result.output_dir} (model card: {result.output_dir / CARD_FILE}, plots: "
              f"{result.output_dir / PLOTS_DIR})")
    if result.results.get("hub_url"):
        print(f"Pushed: {result.results['hub_url']}")
    return 0


def cmd_sweep(args: list) -> int:
    from .artifacts import sweep_table
    from .recipe import load_recipe
    from .sweep import sweep

    recipe_path, flags, overrides = _split_run_args(
        args, {"--ratios": ("0.4,0.5,0.6,0.7,0.8", True), "--budget": ("macs_ratio", True)})
    try:
        ratios = [float(x) for x in flags["--ratios"].split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"hfprune sweep: error: --ratios {flags['--ratios']!r}: expected numbers like 0.4,0.6") \
            from None
    bad = [r for r in ratios if not 0.0 < r <= 1.0]  # refused here too: before the recipe and its imports
    if bad or not ratios:
        raise SystemExit(f"hfprune sweep: error: --ratios {flags['--ratios']!r}: each ratio must be in (0, 1]"
                         + (f", got {bad[0]!r}" if bad else ""))
    recipe = load_recipe(recipe_path, overrides)
    _setup_logging()
    result = sweep(recipe, ratios, key=flags["--budget"])
    print(sweep_table(result))
    print(f"\nPareto plot: {result['plot']}")
    return 0


def cmd_prune(args: list) -> int:
    from transformers import HfArgumentParser

    from ..pruning.config import PruningConfig
    from .recipe import load_recipe
    from .run import run, run_sequential

    parser = HfArgumentParser((PruneArgs, PruningConfig), prog="hfprune prune",
                              description="One-shot pruning of a saved model (a recipe built from these flags).")
    flags = [a for a in args if a in ("--sequential", "--no-sequential")]
    if len(set(flags)) > 1:
        raise SystemExit("hfprune prune: error: give --sequential or --no-sequential, not both")
    requested = None if not flags else flags[0] == "--sequential"
    try:
        prune_args, config = parser.parse_args_into_dataclasses([a for a in args if a not in flags])
    except ValueError as err:  # PruningConfig.__post_init__: a bad or missing budget
        raise SystemExit(f"hfprune prune: error: {err}") from None
    data = prune_data(prune_args)
    if prune_args.task == "causal-lm" and prune_args.max_length is None and data["loader"] != "none":
        data["max_length"] = config.seq_len  # calibrate on blocks as long as the length costs are counted at
    if prune_args.calibration_samples is not None:
        data["calibration_samples"] = prune_args.calibration_samples
    raw = {
        "name": os.path.basename(os.path.normpath(prune_args.output_dir)),
        "method": "oneshot",
        "model": {"path": prune_args.model_dir, "task": prune_args.task, "num_labels": prune_args.num_labels,
                  "trust_remote_code": prune_args.trust_remote_code},
        "data": data,
        "pruning": {k: v for k, v in config.to_dict().items()},
        "evaluation": {"latency": prune_args.latency,
                       "metrics": [] if data["loader"] == "none" else DEFAULT_METRICS.get(prune_args.task, [])},
        "output": {"dir": prune_args.output_dir},
    }
    recipe = load_recipe(raw)
    _setup_logging()
    from .sequential_run import choose_path

    if requested is None and (prune_args.dtype is not None or prune_args.offload_dir is not None):
        requested = True  # both only mean something layer by layer
    sequential, why = choose_path(requested, recipe.pruning, recipe.model.path)
    logging.getLogger("hfprune").info("%s path: %s", "layer-by-layer" if sequential else "in-memory", why)
    if sequential:
        result = run_sequential(recipe, dtype=prune_args.dtype, offload_dir=prune_args.offload_dir)
        print(result.table())
        print(f"\nSaved to {recipe.output_dir}")
        return 0
    if prune_args.dtype is not None or prune_args.offload_dir is not None:
        raise ValueError("--dtype and --offload_dir apply to layer-by-layer pruning; drop --no-sequential")
    recipe.model.sequential = False  # decided above: run() would otherwise decide again from the recipe
    result = run(recipe)
    print(result.table())
    print(f"\nSaved to {result.output_dir}")
    return 0


def cmd_report(args: list) -> int:
    from .report import report

    parser = OneLineParser(prog="hfprune report", description="Tables and PNG plots of a pruned checkpoint.")
    parser.add_argument("dir", help="pruned checkpoint directory")
    parser.add_argument("--out", default=None, help="folder for the PNG plots (default DIR/plots)")
    parser.add_argument("--no-plots", action="store_true", help="print the tables only")
    ns = parser.parse_args(args)
    if not os.path.isdir(ns.dir):
        what = "is a file, not a directory" if os.path.exists(ns.dir) else "does not exist"
        raise FileNotFoundError(f"checkpoint directory {ns.dir!r} {what}")
    if ns.out is not None and not ns.no_plots:
        _check_out_dir(ns.out)
    text, paths = report(ns.dir, ns.out, plots=not ns.no_plots)
    print(text)
    for p in paths:
        print(f"plot: {p}")
    return 0


def _check_out_dir(path: str) -> None:
    """Refuse an output folder that cannot be one (a file, or below a file) before anything is computed."""
    if not path:
        raise ValueError("--out '': give a folder for the plots")
    current = os.path.abspath(path)
    while True:
        if os.path.exists(current):
            if not os.path.isdir(current):
                where = "is" if current == os.path.abspath(path) else f"is below {current!r}, which is"
                raise ValueError(f"--out {path!r} {where} an existing file; give a folder for the plots")
            return
        parent = os.path.dirname(current)
        if parent == current:
            return
        current = parent


def cmd_push(args: list) -> int:
    from .hub import push_to_hub

    parser = argparse.ArgumentParser(prog="hfprune push", description="Push a pruned checkpoint to the Hub.")
    parser.add_argument("dir", help="pruned checkpoint directory (from hfprune run / prune)")
    parser.add_argument("repo_id", help="user/name on the Hub")
    parser.add_argument("--private", action="store_true", default=None, help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`)")
    parser.add_argument("--message", default=None, help="commit message")
    ns = parser.parse_args(args)
    _setup_logging()
    url = push_to_hub(ns.dir, ns.repo_id, token=ns.token, private=ns.private, revision=ns.revision,
                      create_pr=ns.create_pr, commit_message=ns.message)
    print(url)
    return 0


def env_info() -> dict:
    """Versions and machine facts for bug reports (``hfprune env``)."""
    import importlib.metadata
    import platform

    import torch

    from ..version import __version__
    from .evaluation import hardware

    info = {"hfprune": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for dist in ("torch", "transformers", "accelerate", "datasets", "evaluate", "peft", "huggingface_hub",
                 "safetensors", "matplotlib"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = "not installed"
    info["device"] = hardware()
    info["cuda available"] = str(torch.cuda.is_available())
    info["HF_HUB_OFFLINE"] = os.environ.get("HF_HUB_OFFLINE", "unset")
    from ..data.assets import AssetMissing, cache_dir, minilm_dir

    try:
        info["asset: all-MiniLM-L6-v2"] = str(minilm_dir())
    except AssetMissing:
        info["asset: all-MiniLM-L6-v2"] = "not installed (bash benchmarks/install_assets.sh)"
    info["hfprune cache"] = str(cache_dir())
    return info


def cmd_env(args: list) -> int:
    if args:
        raise SystemExit(f"hfprune env: error: takes no arguments, got {args}")
    for key, value in env_info().items():
        print(f"- {key}: {value}")
    return 0


def cmd_sparsify(args: list) -> int:
    from .cli_sparsify import main as sparsify_main

    return sparsify_main(args)


def cmd_serve(args: list) -> int:
    from .cli_serve import main as serve_main

    return serve_main(args)


def cmd_search(args: list) -> int:
    from .cli_search import main as search_main

    return search_main(args)


COMMANDS = {"run": cmd_run, "prune": cmd_prune, "report": cmd_report, "push": cmd_push, "sweep": cmd_sweep,
            "sparsify": cmd_sparsify, "serve": cmd_serve, "env": cmd_env, "search": cmd_search}


def main(argv: list | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(f"usage:\n{USAGE}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"hfprune: error: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if command in ("run", "sweep") and rest[:1] in (["-h"], ["--help"]):
        print(f"usage:\n{USAGE}\n\nOverrides set any recipe key: --pruning.macs_ratio=0.5 --hub.push=true. "
              "See recipes/README.md for the sections and their keys.")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return COMMANDS[command](rest)
    except SystemExit as err:  # argument errors: one line, and a return code the caller can test
        if isinstance(err.code, str):
            print(_one_line(err.code), file=sys.stderr)
            return 2
        return err.code or 0
    except Exception as err:
        from ..core.plan import PlanError
        from ..data.assets import AssetMissing
        from ..metrics import MetricUnavailable
        from .hub import HubPushError
        from .recipe import RecipeError

        if os.environ.get("HFPRUNE_DEBUG") or not isinstance(
                err, (RecipeError, PlanError, HubPushError, AssetMissing, MetricUnavailable, ValueError,
                      FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ImportError)):
            raise
        print(f"hfprune {command}: error: {_one_line(str(err))}", file=sys.stderr)
        return 2


def _one_line(text: str) -> str:
    """Messages quoting YAML parser output span lines; the command's errors are one line each."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
