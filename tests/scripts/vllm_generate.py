"""Greedy generation with vLLM, run in .venv-vllm by tests/test_vllm.py.

    .venv-vllm/bin/python tests/scripts/vllm_generate.py SPEC.json OUT.json

SPEC: {"models": [DIR, ...], "prompts": [[token ids], ...], "max_tokens": N}. OUT: {DIR: [[token ids], ...]} for a
model that served, {DIR: {"error": "Type: message"}} for one vLLM refused. Token ids in, token ids out
(``skip_tokenizer_init``): the tiny test models have no tokenizer.
"""

import gc
import json
import os
import sys
import traceback

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: faster start

from vllm import LLM, SamplingParams  # noqa: E402


def main(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    prompts = [{"prompt_token_ids": ids} for ids in spec["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    out = {}
    for directory in spec["models"]:
        try:
            llm = LLM(directory, skip_tokenizer_init=True, enforce_eager=True, dtype="float32", max_model_len=128,
                      max_num_seqs=8, seed=0)
            results = llm.generate(prompts, params, use_tqdm=False)
            out[directory] = [list(r.outputs[0].token_ids) for r in results]
            del llm
        except Exception as err:  # noqa: BLE001 - reported to the test, which checks the message
            traceback.print_exc()
            out[directory] = {"error": f"{type(err).__name__}: {err}"}
            # a failed engine start leaves vLLM's process groups half set up; the next LLM needs them gone
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
        gc.collect()
    json.dump(out, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
