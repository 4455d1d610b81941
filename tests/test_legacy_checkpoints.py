"""Checkpoints saved by an earlier hfprune (0.1.0, tests/fixtures/make_legacy_checkpoints.py) still reload to the
outputs their pruned model gave: through transformers with the checkpoint's own code, and through
``hfprune.from_pretrained`` with the installed code. Guards the saved format across refactors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import hfprune

from .cases import CASES

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints_v0_1_0"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())


def _outputs(model_type: str, model, directory: Path) -> tuple:
    inputs = load_file(str(directory / "inputs.safetensors"))
    torch.manual_seed(1234)
    with torch.no_grad():
        picked = CASES[model_type].outputs(model.eval()(**inputs))
    return picked if isinstance(picked, (tuple, list)) else (picked,)


def _expected(directory: Path) -> list:
    tensors = load_file(str(directory / "expected.safetensors"))
    return [tensors[f"expected.{i}"] for i in range(len(tensors))]


@pytest.fixture
def checkpoint(request, tmp_path) -> Path:
    # a copy: loading may write (transformers' remote-code cache is elsewhere, but keep the fixture pristine)
    return Path(shutil.copytree(FIXTURES / request.param, tmp_path / request.param))


@pytest.mark.parametrize("checkpoint", sorted(MANIFEST["cases"]), indirect=True)
@pytest.mark.parametrize("loader", ["transformers", "hfprune"])
def test_legacy_checkpoint_reloads_to_saved_outputs(checkpoint, loader):
    info = MANIFEST["cases"][checkpoint.name]
    cls = getattr(transformers, info["class"])
    if loader == "hfprune":
        model = hfprune.from_pretrained(checkpoint)
    else:
        model = cls.from_pretrained(checkpoint) if info["plain"] else \
            _auto_class(checkpoint, info["class"]).from_pretrained(checkpoint, trust_remote_code=True)
    assert isinstance(model, cls)
    got, expected = _outputs(info["model_type"], model, checkpoint), _expected(checkpoint)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def _auto_class(directory: Path, class_name: str):
    """The auto class whose ``auto_map`` entry is the checkpoint's head class (AutoModel maps to the base model)."""
    auto_map = json.loads((directory / "config.json").read_text())["auto_map"]
    return getattr(transformers, next(k for k, v in sorted(auto_map.items()) if v.endswith(f"Pruned{class_name}")))
