"""Push to a Hub-compatible server on 127.0.0.1, load back by repo id, read the card back; and the failures."""

import contextlib
import hashlib
import io

import pytest
import torch
import transformers as T
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import RepositoryNotFoundError

from hfprune.pipeline.cli import main
from hfprune.pipeline.hub import HubPushError, push_to_hub

from .hub_server import serving
from .test_cli import tiny_recipe


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The server, with huggingface_hub pointed at it and online (conftest sets HF_HUB_OFFLINE=1 otherwise)."""
    with serving(monkeypatch, tmp_path) as server:
        yield server


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A pruned checkpoint written by ``hfprune run`` (weights, modeling code, card, plots, results)."""
    root = tmp_path_factory.mktemp("hub")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", str(tiny_recipe(root)), "--evaluation.latency_rounds=1"]) == 0
    return root / "out"


def digest(directory) -> dict:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_push_then_load_by_repo_id(hub, checkpoint, tmp_path):
    before = digest(checkpoint)
    url = push_to_hub(checkpoint, "tester/tiny-pruned", private=True)
    assert url.startswith(f"{hub.url}/tester/tiny-pruned/commit/")
    assert digest(checkpoint) == before  # pushing only reads the checkpoint
    local = T.AutoModelForSequenceClassification.from_pretrained(checkpoint, trust_remote_code=True).eval()
    remote = T.AutoModelForSequenceClassification.from_pretrained(
        "tester/tiny-pruned", trust_remote_code=True, cache_dir=tmp_path / "cache").eval()
    ids = torch.randint(4, local.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(local(input_ids=ids).logits, remote(input_ids=ids).logits)
    assert sum(p.numel() for p in remote.parameters()) == sum(p.numel() for p in local.parameters())


def test_card_metadata_reads_back(hub, checkpoint):
    push_to_hub(checkpoint, "tester/tiny-card")
    card = ModelCard.load("tester/tiny-card")
    data = card.data.to_dict()
    assert data["base_model"] == "hf-internal-testing/tiny-bert"
    assert data["library_name"] == "transformers"
    assert {"hfprune", "pruned"} <= set(data["tags"]) and "distilled" not in data["tags"]
    metrics = data["model-index"][0]["results"][0]["metrics"]
    names = {m["name"] for m in metrics}
    assert {"accuracy (dense, before pruning)", "accuracy (pruned)", "f1 (pruned)"} <= names
    assert all(0.0 <= m["value"] <= 1.0 for m in metrics)
    assert '"tester/tiny-card"' in card.text  # the load snippet names the repo
    assert "![kept structure](plots/kept_structure.png)" in card.text and "| layer 0 |" in card.text
    info = HfApi().model_info("tester/tiny-card")
    assert {"plots/kept_structure.png", "modeling_hfprune.py", "recipe.yaml"} <= {s.rfilename for s in info.siblings}


def test_private_repo_is_hidden_without_token(hub, checkpoint):
    push_to_hub(checkpoint, "tester/secret", private=True)
    assert HfApi().model_info("tester/secret").private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info("tester/secret")


def test_push_to_branch_and_pull_request(hub, checkpoint, tmp_path):
    push_to_hub(checkpoint, "tester/branches", revision="pruned-v1")
    repo = hub.repos["tester/branches"]
    assert "config.json" in repo.commits[repo.branches["pruned-v1"]]
    assert "config.json" not in repo.commits[repo.branches["main"]]  # main untouched
    model = T.AutoModelForSequenceClassification.from_pretrained(
        "tester/branches", revision="pruned-v1", trust_remote_code=True, cache_dir=tmp_path / "cache")
    assert model.config.model_type == "bert"
    url = push_to_hub(checkpoint, "tester/branches", create_pr=True)
    assert url == f"{hub.url}/tester/branches/discussions/1"


def test_missing_token_is_clear(hub, checkpoint, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubPushError, match="no Hugging Face token found: set HF_TOKEN"):
        push_to_hub(checkpoint, "tester/x")
    assert not hub.repos


def test_refused_token_is_clear_and_checkpoint_intact(hub, checkpoint):
    before = digest(checkpoint)
    with pytest.raises(HubPushError, match="refused the token \\(401 Unauthorized\\)"):
        push_to_hub(checkpoint, "tester/x", token="hf_wrong")
    assert digest(checkpoint) == before and not hub.repos


def test_dropped_connection_is_clear_and_nothing_committed(hub, checkpoint):
    before = digest(checkpoint)
    hub.drop_next = "commit"
    with pytest.raises(HubPushError, match="connection to .* failed .* intact: run the push again"):
        push_to_hub(checkpoint, "tester/dropped")
    assert digest(checkpoint) == before
    repo = hub.repos["tester/dropped"]
    assert repo.commits[repo.branches["main"]] == {}  # nothing landed
    push_to_hub(checkpoint, "tester/dropped")  # and a retry goes through
    assert "model.safetensors" in repo.commits[repo.branches["main"]]


def test_push_command(hub, checkpoint, capsys):
    assert main(["push", str(checkpoint), "tester/cli", "--private", "--revision", "v2"]) == 0
    assert capsys.readouterr().out.strip().startswith(f"{hub.url}/tester/cli/commit/")
    assert hub.repos["tester/cli"].private and "v2" in hub.repos["tester/cli"].branches


def test_incomplete_checkpoint_is_refused(hub, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(HubPushError, match="no \\*.safetensors weights"):
        push_to_hub(tmp_path, "tester/x")
