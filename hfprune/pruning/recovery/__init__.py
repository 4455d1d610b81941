# Copyright hfprune contributors. Apache-2.0.
"""Recovery after selection, retraining-free: each method one module, applied to the dense model before slicing.

* :mod:`.fisher_rearrange`: mask rearrangement (Kwon et al. 2022): re-pick which units go, from the Fisher block.
* :mod:`.lstsq`: mask tuning (Kwon et al. 2022): least-squares output scales folded into the weights.
* :mod:`.bias`: bias compensation (An et al. 2024, FLAP): removed units' mean outputs folded into the bias.
* :mod:`.obs`: structured OBS (ZipLM, SlimGPT): layer-wise reconstruction of the output projections.
* :mod:`.tunable`: the output projections all of them change.

``PruningConfig(recovery=...)`` and ``bias_compensation`` pick among them. Exported here: every public name of the
former single module (``recovery.tune_scales``, ``recovery.compensate_biases``, ...), plus OBS's :func:`reconstruct`;
``hfprune.pruning.obs`` (and ``hfprune.obs``) are aliases of :mod:`.obs`.
"""

from __future__ import annotations

from .bias import bias_flags_needed, compensate_biases, compensation, mean_inputs
from .fisher_rearrange import greedy_removal, group_fisher, quadratic_loss, rearrange, rearrange_kept
from .lstsq import CACHE_BYTES, CLAMP, RIDGE, fold_scales, normal_equations, residual, solve_scales, tune_scales
from .obs import reconstruct
from .tunable import tunable_blocks

__all__ = [
    "CACHE_BYTES", "CLAMP", "RIDGE", "bias_flags_needed", "compensate_biases", "compensation", "fold_scales",
    "greedy_removal", "group_fisher", "mean_inputs", "normal_equations", "quadratic_loss", "rearrange",
    "rearrange_kept", "reconstruct", "residual", "solve_scales", "tunable_blocks", "tune_scales",
]
