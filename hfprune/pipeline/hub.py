# Copyright hfprune contributors. Apache-2.0.
"""Push a pruned checkpoint directory to the Hugging Face Hub: weights, modeling code, plan, plots, model card.

The token comes from the usual places (``token=``, ``HF_TOKEN``, the file ``hf auth login`` writes). A missing
token, a refused one (401/403) or a dropped connection raises :class:`HubPushError` with what to do; the local
directory is only ever read, so it stays intact whatever happens.

Example (``hfprune push outputs/minilm-movie-oneshot me/minilm-movie-pruned --private``):

```python
>>> from hfprune.pipeline.hub import push_to_hub
>>> push_to_hub("outputs/minilm-movie-oneshot", "me/minilm-movie-pruned", private=True)  # doctest: +SKIP
'https://huggingface.co/me/minilm-movie-pruned/commit/...'
```
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .artifacts import CARD_FILE

logger = logging.getLogger("hfprune")


class HubPushError(RuntimeError):
    """Pushing failed; the message says why and what to do. The local checkpoint is untouched."""


def check_checkpoint(directory: Path) -> None:
    """A pushable checkpoint: config, weights, and the modeling file its ``auto_map`` names."""
    if not directory.is_dir():
        raise HubPushError(f"{directory} is not a directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise HubPushError(f"{directory} has no config.json: not a saved model")
    if not any(directory.glob("*.safetensors")):
        raise HubPushError(f"{directory} has no *.safetensors weights")
    config = json.loads(config_path.read_text())
    auto_map = config.get("auto_map") or {}
    for ref in auto_map.values():
        module = (ref[-1] if isinstance(ref, list) else ref).split("--")[-1].split(".")[0]
        if not (directory / f"{module}.py").is_file():
            raise HubPushError(f"{directory}: config.json's auto_map needs {module}.py, which is missing")
    from ..core.checkpoint.load import checkpoint_plan

    try:  # what is pushed must say one thing: prune_plan.json and config.json's record agree
        checkpoint_plan(directory, config)
    except ValueError as err:
        raise HubPushError(f"not pushing an inconsistent checkpoint: {err}") from None


def card_bytes(directory: Path, repo_id: str) -> bytes:
    """The card to upload: the checkpoint's README.md (or one built now), with the repo id filled in. Built in
    memory: pushing never writes into the checkpoint."""
    path = directory / CARD_FILE
    if path.is_file():
        text = path.read_text()
    else:
        from .card import build_card

        text = str(build_card(directory))
    return text.replace('"REPO_ID"', json.dumps(repo_id)).encode()


def _transport_errors() -> tuple:
    """Network failures: huggingface_hub's HTTP client (httpx2 in 2.x, httpx before) raises TransportError."""
    import importlib

    errors = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _files(directory: Path) -> list:
    """Files to upload, relative paths; hidden files and folders (temporary, trainer state) stay local."""
    return sorted(p for p in directory.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def push_to_hub(directory: str | Path, repo_id: str, *, token: str | None = None, private: bool | None = None,
                revision: str | None = None, create_pr: bool = False, commit_message: str | None = None,
                endpoint: str | None = None) -> str:
    """Create ``repo_id`` if needed (``private`` when asked), the branch ``revision`` if needed, and upload the
    checkpoint in one commit (a pull request with ``create_pr``). Returns the commit (or pull request) URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    directory = Path(directory)
    check_checkpoint(directory)
    token = token or get_token()
    endpoint = endpoint or constants.ENDPOINT
    if not token:
        raise HubPushError(
            "no Hugging Face token found: set HF_TOKEN, run `hf auth login`, or pass --token. "
            f"Nothing was uploaded; {directory} is unchanged."
        )
    if constants.HF_HUB_OFFLINE:
        raise HubPushError(f"HF_HUB_OFFLINE is set, so nothing can be pushed; unset it to push {directory}")
    api = HfApi(endpoint=endpoint, token=token)
    ops = [CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card_bytes(directory, repo_id))]
    ops += [CommitOperationAdd(path_in_repo=p.relative_to(directory).as_posix(), path_or_fileobj=str(p))
            for p in _files(directory) if p.relative_to(directory).as_posix() != CARD_FILE]
    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        message = commit_message or f"Upload pruned model ({directory.name}) with hfprune"
        info = api.create_commit(repo_id, ops, revision=revision, create_pr=create_pr, commit_message=message)
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            raise HubPushError(
                f"the Hub at {endpoint} refused the token (401 Unauthorized) while pushing to {where}: it is invalid "
                f"or expired. Log in again (`hf auth login`) or set HF_TOKEN. {directory} is unchanged."
            ) from None
        if status == 403:
            raise HubPushError(
                f"the token may not write to {where} (403 Forbidden): use a token with write access to that "
                f"namespace. {directory} is unchanged."
            ) from None
        raise HubPushError(f"pushing to {where} failed: {err}. {directory} is unchanged.") from None
    except _transport_errors() as err:
        raise HubPushError(
            f"the connection to {endpoint} failed while pushing to {where} ({type(err).__name__}: {err}). Nothing "
            f"is committed unless the Hub says so; {directory} is intact: run the push again."
        ) from None
    url = info.pr_url or info.commit_url
    logger.info("pushed %s to %s", directory, url)
    return url
