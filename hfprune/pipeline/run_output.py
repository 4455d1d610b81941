# Copyright hfprune contributors. Apache-2.0.
"""The output folder of a recipe run (:func:`hfprune.pipeline.run.run`), written as one transaction. Its file names
and results schema are :mod:`hfprune.pipeline.artifacts`'."""

from __future__ import annotations

import logging
from pathlib import Path

from .artifacts import CARD_FILE, RECIPE_FILE, SCORES_FILE, scores_to_tensors, write_results
from .recipe import Recipe

logger = logging.getLogger("hfprune")


def save_run(recipe: Recipe, model, tokenizer, results: dict, scores: dict) -> Path:
    """Write checkpoint, tokenizer, results, recipe, importance scores, plots and card into the output folder as
    one transaction (``modeling.transaction``): a failed or killed run leaves the previous output as it was, and
    the folder's other files stay."""
    from safetensors.torch import save_file

    from ..core.checkpoint.save import stage_checkpoint, weight_names
    from ..core.checkpoint.transaction import Transaction

    final = recipe.output_dir
    txn = Transaction(final, weights=weight_names(model))
    with txn as staging:
        stage_checkpoint(model, txn)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / RECIPE_FILE).write_text(recipe.to_yaml())
        if scores:
            save_file(scores_to_tensors(scores), str(staging / SCORES_FILE))
        if recipe.output.plots:
            from .report import draw_plots

            results["plots"] = [p.relative_to(staging).as_posix() for p in draw_plots(staging, results)]
        write_results(staging, results)
        if recipe.output.card:
            from .card import build_card

            build_card(staging).save(staging / CARD_FILE)
    logger.info("saved to %s", final)
    return final
