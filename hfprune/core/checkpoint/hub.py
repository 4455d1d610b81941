# Copyright hfprune contributors. Apache-2.0.
"""``save_pretrained(..., push_to_hub=True)`` of a pruned model: the save commits into the folder, then the files
it wrote go to the Hub in one commit.

transformers uploads from inside its own save, the files whose modification time the save changed. A pruned
model's save writes into a staging folder and adds ``prune_plan.json`` and ``modeling_hfprune.py`` after
transformers is done, so hfprune uploads itself, with transformers' arguments and model card: exactly the files the
save committed, never the rest of the folder (tokenizer, notes, ``checkpoint-N/``).
"""

from __future__ import annotations

import logging

from torch import nn

from .. import structure
from .transaction import Transaction, stale_weight_names

logger = logging.getLogger("hfprune")

CARD_FILE = "README.md"


def push_saved(model: nn.Module, txn: Transaction, *, repo_id: str, private: bool | None = None,
               token: str | bool | None = None, commit_message: str | None = None,
               commit_description: str | None = None, create_pr: bool = False, revision: str | None = None,
               tags: list | str | None = None) -> None:
    """Upload the files the committed save ``txn`` wrote to ``repo_id`` (created if needed, ``private`` when asked),
    on branch ``revision`` (created if needed) or as a pull request (``create_pr``).

    The commit also carries the model card transformers would write (the repo's card, or its default one, tagged
    with ``model.model_tags`` and ``tags``; the folder's own README.md is neither read nor written) and removes the
    repo's files this checkpoint supersedes: weight files of the other layout (a stale ``model.safetensors`` would
    shadow new shards at load) and the ``modeling_hfprune.py`` (with its engine files) no longer referenced when the
    checkpoint is plain.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from transformers.utils.hub import create_and_tag_model_card

    api = HfApi(token=token)
    files = list(txn.files)
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    tags = list(dict.fromkeys(list(getattr(model, "model_tags", None) or []) + tags))
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        existing = {s.rfilename for s in api.model_info(repo_id, revision=revision).siblings or ()}
        card = create_and_tag_model_card(repo_id, tags or None, token=token)
        ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(txn.target / f)) for f in files]
        ops.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=str(card).encode()))
        ops += [CommitOperationDelete(path_in_repo=n) for n in superseded_on_hub(existing, files, txn.weights)]
        info = api.create_commit(repo_id, ops, commit_message=commit_message or "Upload pruned model (hfprune)",
                                 commit_description=commit_description, create_pr=create_pr, revision=revision)
    except Exception:
        logger.error("%s holds the saved checkpoint, but pushing it to %s failed: push the folder again "
                     "(`hfprune push %s %s`) once the cause below is fixed", txn.target, repo_id, txn.target, repo_id)
        raise
    logger.info("pushed %s to %s", txn.target, info.pr_url or info.commit_url)


def superseded_on_hub(existing, files: list, weights: tuple | None) -> list:
    """The repo's top-level files (``existing``) that the checkpoint of ``files`` supersedes; see :func:`push_saved`."""
    top = {n for n in existing if "/" not in n}
    new = {f for f in files if "/" not in f}
    stale = stale_weight_names(top, weights, new) if weights else []
    if structure.MODELING_FILE in top and structure.MODELING_FILE not in new:  # remote code gone: its engine too
        stale += [n for n in (structure.MODELING_FILE, *structure.ENGINE_FILES.values()) if n in top and n not in new]
    return stale
