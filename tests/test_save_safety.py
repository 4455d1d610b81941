"""Saving a pruned model never deletes the user's files, and a failed or killed save leaves the old checkpoint or
the new one, whole (``hfprune.core.checkpoint.transaction``)."""

from __future__ import annotations

import ast
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import transformers as T

import hfprune
from hfprune.core.checkpoint import transaction
from hfprune.core.checkpoint.save import CODE_FILES, MODELING_FILE
from hfprune.pipeline.hub import _files as pushed_files

REMOTE = {"layers": [{"heads": [0, 3], "ffn": list(range(10))}, {}]}  # per-layer: saved with remote code
PLAIN = {"layers": [{"ffn": list(range(0, 64, 2))}, {"ffn": list(range(32))}]}  # uniform FFN: a plain checkpoint

# What a user keeps in an output folder: tokenizer files, notes, a Trainer checkpoint, git metadata, and names that
# look like weights but that transformers' stale-shard rule does not match (another prefix, no shard pattern).
USER_FILES = {
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "WordLevel"}}\n',
    "tokenizer_config.json": b'{"model_max_length": 64}\n',
    "vocab.txt": b"[PAD]\n[UNK]\nhello\n",
    "README.md": b"# My pruned BERT\n\nNotes I wrote by hand.\n",
    "notes.csv": b"step,loss\n1,0.5\n",
    "checkpoint-500/trainer_state.json": b'{"global_step": 500}\n',
    "checkpoint-500/model.safetensors": b"weights of step 500",
    "checkpoint-500/optimizer.pt": b"optimizer state",
    ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
    ".git/HEAD": b"ref: refs/heads/main\n",
    "mymodel-00001-of-00002.safetensors": b"not ours: another prefix",
    "model_card_notes.txt": b"not ours: no shard pattern",
    "structure_specs.py": b"# a user's module named like one of hfprune's engine files (saved under other names)\n",
}


def tiny_bert(plan: dict, seed: int = 0, cls=T.BertModel):
    torch.manual_seed(seed)
    config = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          vocab_size=100, max_position_embeddings=64, num_labels=2)
    return hfprune.apply_plan(cls(config).eval(), plan)


def write_user_files(directory: Path, skip=()) -> None:
    for rel, data in USER_FILES.items():
        if rel in skip:
            continue
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)


def state(directory: Path, memo: dict | None = None) -> dict:
    """Every file below ``directory``, hidden ones included, by relative path: its content hash (or link target)."""
    out = {}
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in names:
            path = Path(root) / name
            rel = path.relative_to(directory).as_posix()
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
                continue
            st = path.stat()
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if memo is None or key not in memo:
                digest = hashlib.sha1()
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
                if memo is None:
                    out[rel] = digest.hexdigest()
                    continue
                memo[key] = digest.hexdigest()
            out[rel] = memo[key]
    return out


def user_state() -> dict:
    return {rel: hashlib.sha1(data).hexdigest() for rel, data in USER_FILES.items()}


def fresh_state(model, tmp_path: Path, **kwargs) -> dict:
    """The files a save of ``model`` writes into an empty folder."""
    directory = tmp_path / f"fresh-{time.monotonic_ns()}"
    model.save_pretrained(directory, **kwargs)
    out = state(directory)
    shutil.rmtree(directory)
    return out


def same_outputs(directory: Path, model) -> None:
    loaded = T.AutoModel.from_pretrained(directory, trust_remote_code=True).eval()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)


def staging_folders(directory: Path) -> list:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(transaction.STAGING_PREFIX))


# ---- a save into a folder that holds other things ----------------------------------------------------------------


@pytest.mark.parametrize("plan", [REMOTE, PLAIN], ids=["remote-code", "plain"])
def test_save_keeps_the_folders_other_files(tmp_path, plan):
    target = tmp_path / "out"
    target.mkdir()
    write_user_files(target)
    model = tiny_bert(plan)
    assert model.hfprune_heterogeneous == (plan is REMOTE)
    expected = {**user_state(), **fresh_state(model, tmp_path)}
    for _ in range(2):  # into a folder with no checkpoint, then over its own checkpoint
        model.save_pretrained(target)
        assert state(target) == expected
        assert sorted(tmp_path.iterdir()) == [target]
    same_outputs(target, model)


def test_trainer_save_model_keeps_its_checkpoints(tmp_path):
    model = tiny_bert(REMOTE, cls=T.BertForSequenceClassification)
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 100, (8,), generator=gen), "labels": torch.tensor(i % 2)}
            for i in range(16)]
    args = T.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, save_strategy="steps", save_steps=2,
                               per_device_train_batch_size=4, report_to=[], use_cpu=True, disable_tqdm=True,
                               logging_strategy="no")
    trainer = T.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    out = tmp_path / "run"
    checkpoints = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    (out / "notes.txt").write_text("mine")
    before = {name: state(out / name) for name in checkpoints}
    assert all(MODELING_FILE in files and "optimizer.pt" in files for files in before.values())

    trainer.save_model()
    trainer.save_model()  # again, over the first
    assert {name: state(out / name) for name in checkpoints} == before
    assert (out / "notes.txt").read_text() == "mine" and not staging_folders(out)
    loaded = T.AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True).eval()
    ids = torch.randint(0, 100, (2, 8), generator=gen)
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits)


@pytest.mark.parametrize("first,second", [("40KB", None), (None, "40KB"), ("40KB", "100KB")],
                         ids=["sharded-then-single", "single-then-sharded", "more-then-fewer-shards"])
def test_resharding_removes_exactly_the_stale_weights(tmp_path, first, second):
    target = tmp_path / "out"
    target.mkdir()
    write_user_files(target)
    old, new = tiny_bert(REMOTE, seed=0), tiny_bert(PLAIN, seed=1)
    old.save_pretrained(target, **({"max_shard_size": first} if first else {}))
    old_files = set(state(target)) - set(USER_FILES)
    kwargs = {"max_shard_size": second} if second else {}
    expected = {**user_state(), **fresh_state(new, tmp_path, **kwargs)}
    new.save_pretrained(target, **kwargs)
    assert state(target) == expected
    removed = old_files - set(expected)
    assert removed and all(n.startswith("model") or n in CODE_FILES for n in removed), removed
    assert any("-of-" in n or n.endswith(".index.json") or n == "model.safetensors" for n in removed)
    same_outputs(target, new)  # with a stale single file left beside new shards, the old weights would load


# ---- paths that are not folders ----------------------------------------------------------------------------------


def test_a_file_path_is_refused_and_left_alone(tmp_path):
    model = tiny_bert(PLAIN)
    path = tmp_path / "ckpt"
    path.write_bytes(b"precious")
    link, dangling = tmp_path / "link", tmp_path / "dangling"
    link.symlink_to(path)
    dangling.symlink_to(tmp_path / "nowhere")
    for target in (path, link, dangling):
        with pytest.raises(FileExistsError, match=re.escape(str(target))):
            model.save_pretrained(target)
        with pytest.raises(FileExistsError):  # on every rank, so the main one does not fail alone
            model.save_pretrained(target, is_main_process=False)
    assert path.read_bytes() == b"precious" and os.readlink(link) == str(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "dangling", "link"]

    # a symlink to a folder is a folder: the save goes into it
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "to-real").symlink_to(real)
    model.save_pretrained(tmp_path / "to-real")
    assert (tmp_path / "to-real").is_symlink() and (real / "config.json").is_file()


def test_other_ranks_and_a_refused_push_write_nothing(tmp_path):
    model = tiny_bert(REMOTE)
    model.save_pretrained(tmp_path / "a", is_main_process=False)
    # pushing works (tests/test_hf_habits.py); an argument it does not know is refused before the save
    with pytest.raises(TypeError, match="no_such_argument"):
        model.save_pretrained(tmp_path / "b", push_to_hub=True, no_such_argument=1)
    assert list(tmp_path.iterdir()) == []


# ---- failures and leftovers --------------------------------------------------------------------------------------


def test_failed_save_keeps_the_old_checkpoint_and_a_leftover_is_cleaned(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    write_user_files(target)
    old, new = tiny_bert(REMOTE, seed=0), tiny_bert(PLAIN, seed=1)
    old.save_pretrained(target, max_shard_size="100KB")
    before = state(target)
    real_write = T.modeling_utils.safe_save_file
    written = []

    def disk_full(tensors, filename, metadata=None):  # the first shard is written, the second fails half-way
        written.append(filename)
        if len(written) == 2:
            Path(filename).write_bytes(b"half a shard")
            raise OSError("disk full")
        return real_write(tensors, filename, metadata=metadata)

    monkeypatch.setattr(T.modeling_utils, "safe_save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(target, max_shard_size="40KB")
    monkeypatch.undo()
    assert len(written) == 2 and state(target) == before

    # what a killed save leaves: a staging folder with half the files and no commit marker
    leftover = target / f"{transaction.STAGING_PREFIX}0123456789ab"
    leftover.mkdir()
    (leftover / "config.json").write_text(json.dumps(new.config.to_dict()))
    (leftover / "model.safetensors").write_bytes(b"half")
    assert not [p for p in pushed_files(target) if transaction.STAGING_PREFIX in str(p)]
    same_outputs(target, old)  # transformers reads the old checkpoint, not the leftover
    new.save_pretrained(target)
    assert not leftover.exists()
    assert state(target) == {**user_state(), **fresh_state(new, tmp_path)}


def test_a_save_interrupted_after_its_commit_is_finished(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    write_user_files(target)
    old, new = tiny_bert(PLAIN, seed=0), tiny_bert(REMOTE, seed=1)
    old.save_pretrained(target)
    real_replace, moved = os.replace, []

    def interrupted(src, dst):  # the third file to move in fails, as a kill there would stop it
        if Path(src).parent.name.startswith(transaction.STAGING_PREFIX) and Path(dst).name != transaction.MARKER:
            moved.append(Path(dst).name)
            if len(moved) == 3:
                raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(transaction.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(target)
    monkeypatch.undo()
    (leftover,) = staging_folders(target)
    assert (target / leftover / transaction.MARKER).is_file()
    assert "config.json" not in moved  # it moves last: the old config still describes the folder
    transaction.recover(target)
    assert state(target) == {**user_state(), **fresh_state(new, tmp_path)}
    same_outputs(target, new)


def test_recovery_waits_for_a_save_in_progress(tmp_path):
    import fcntl

    target = tmp_path / "out"
    target.mkdir()
    busy = target / f"{transaction.STAGING_PREFIX}busy"
    busy.mkdir()
    fd = os.open(target, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a save in another process holds
        transaction.recover(target, timeout=0.2)
        assert busy.is_dir()
    finally:
        os.close(fd)
    transaction.recover(target)
    assert not busy.exists()


def test_leftovers_of_older_versions_are_cleaned_and_hidden_user_files_stay(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    write_user_files(target)
    ours = [".ckpt.hfprune-tmp-0123abcd", ".ckpt.hfprune-old-89abcdef", ".ckpt.run-deadbeef"]
    theirs = [".ckpt.backup", ".ckpt.hfprune-tmp-notours", ".other.hfprune-tmp-0123abcd", ".ckpt.run-0123abcd.txt"]
    for name in ours + theirs[:-1]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / theirs[-1]).write_text("a file, not a folder we wrote")
    model = tiny_bert(REMOTE)
    model.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt"] + theirs)
    assert state(target) == {**user_state(), **fresh_state(model, tmp_path)}

    # an older version killed between its two renames left the user's folder renamed away: it comes back
    before = state(target)
    os.replace(target, tmp_path / ".ckpt.hfprune-old-0badc0de")
    (tmp_path / ".ckpt.hfprune-tmp-0badc0de").mkdir()
    transaction.recover(target)
    assert state(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt"] + theirs)


def test_marker_paths_cannot_leave_the_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (tmp_path / "victim.safetensors").write_bytes(b"keep")
    staging = target / f"{transaction.STAGING_PREFIX}evil"
    staging.mkdir()
    (staging / transaction.MARKER).write_text(json.dumps({"files": ["../escape.txt"], "stale": []}))
    with pytest.raises(ValueError, match="not a path inside"):
        transaction.recover(target)
    (staging / transaction.MARKER).write_text(json.dumps({"files": [], "stale": ["../victim.safetensors"]}))
    transaction.recover(target)
    assert (tmp_path / "victim.safetensors").read_bytes() == b"keep" and not staging.exists()


# ---- hfprune run's output ----------------------------------------------------------------------------------------


def test_run_output_keeps_the_folders_other_files(tmp_path, monkeypatch):
    from hfprune.pipeline.recipe import load_recipe
    from hfprune.pipeline.run import run, save_run

    from .test_cli import tiny_recipe

    recipe = load_recipe(tiny_recipe(tmp_path), ["--evaluation.latency_rounds=1"])
    out = recipe.output_dir
    out.mkdir(parents=True)
    ours = ("README.md", "tokenizer.json", "tokenizer_config.json")  # the run writes its card and tokenizer there
    write_user_files(out, skip=ours)
    kept = {k: v for k, v in user_state().items() if k not in ours}
    result = run(recipe)
    files = state(out)
    assert {k: files[k] for k in kept} == kept and not staging_folders(out)
    for name in ("config.json", "model.safetensors", "recipe.yaml", "hfprune_results.json", "README.md",
                 "plots/kept_structure.png", "importance.safetensors"):
        assert name in files, name
    assert json.loads((out / "hfprune_results.json").read_text())["plots"] == ["plots/kept_structure.png",
                                                                              "plots/importance.png"]

    # a run that fails while writing its output leaves the previous output, byte for byte
    import hfprune.pipeline.card

    def broken_card(*args, **kwargs):
        raise RuntimeError("card failed")

    tokenizer = T.AutoTokenizer.from_pretrained(recipe.model.path)
    monkeypatch.setattr(hfprune.pipeline.card, "build_card", broken_card)
    with pytest.raises(RuntimeError, match="card failed"):
        save_run(recipe, result.model, tokenizer, dict(result.results), result.scores)
    monkeypatch.undo()
    assert state(out) == files and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]

    save_run(recipe, result.model, tokenizer, dict(result.results), result.scores)
    assert set(state(out)) == set(files) and {k: state(out)[k] for k in kept} == kept
    T.AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True)


# ---- kill -9 at many moments of a large save ---------------------------------------------------------------------

BIG = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, intermediate_size=4096, vocab_size=1000,
           max_position_embeddings=128)
SLOW_MOVE = 0.02  # seconds each rename into place takes in the killed process, so kills land between them


def big_bert(plan: dict, shift: float):
    """A ~300 MB pruned BERT with deterministic weights, without the cost of random initialisation."""
    with torch.device("meta"):
        model = T.BertModel(T.BertConfig(**BIG))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.fill_(shift + 0.01 * (i % 13))
        model.embeddings.position_ids.copy_(torch.arange(BIG["max_position_embeddings"]))  # non-persistent buffers
        model.embeddings.token_type_ids.zero_()
    return hfprune.apply_plan(model, plan).eval()


def _save_child(model, target: str, ready, slow: float) -> None:
    """The killed process: forked, so it inherits the model instead of building it again."""
    real_replace = os.replace

    def slow_replace(src, dst):
        real_replace(src, dst)
        time.sleep(slow)

    os.replace = slow_replace
    ready.set()
    model.save_pretrained(target, max_shard_size="40MB")


def _recover_child(target: str, ready, slow: float) -> None:
    real_replace = os.replace

    def slow_replace(src, dst):
        real_replace(src, dst)
        time.sleep(slow)

    os.replace = slow_replace
    ready.set()
    transaction.recover(target)


def _marker_path(target: Path) -> Path | None:
    for name in staging_folders(target):
        if (target / name / transaction.MARKER).exists():
            return target / name / transaction.MARKER
    return None


@pytest.mark.slow
def test_kill_9_at_any_moment_leaves_the_old_or_the_new_checkpoint(tmp_path):
    ctx = multiprocessing.get_context("fork")  # the model is built once; each killed save is a forked copy
    old = big_bert({"layers": [{"ffn": list(range(1024))}] * 12}, 0.0)
    new = big_bert({"layers": [{"heads": list(range(6 + i % 6)), "ffn": list(range(1536 + 256 * (i % 4)))}
                               for i in range(12)]}, 0.5)
    assert not old.hfprune_heterogeneous and new.hfprune_heterogeneous
    reference = tmp_path / "old"
    reference.mkdir()
    write_user_files(reference)
    old.save_pretrained(reference, max_shard_size="100MB")
    memo = {}
    old_state = state(reference, memo)
    target = tmp_path / "work"

    def reset() -> None:
        # Hard links: a save never writes into an existing file (it renames new files over them), so the reference
        # stays intact, and the hashes below check that too.
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(reference, target, copy_function=os.link)

    def trial(child, delay=None, after_marker=None) -> tuple:
        ready = ctx.Event()
        proc = ctx.Process(target=child, args=(new, str(target), ready, SLOW_MOVE) if child is _save_child
                           else (str(target), ready, SLOW_MOVE))
        proc.start()
        assert ready.wait(60)
        start, committed_at = time.monotonic(), None
        if delay is None:  # watch for the commit marker (and, with after_marker, kill once it is there)
            while _marker_path(target) is None and proc.is_alive():
                time.sleep(0.001)
            committed_at = time.monotonic() - start
            if after_marker is not None:
                time.sleep(after_marker)
        else:
            time.sleep(delay)
        if delay is not None or after_marker is not None:
            proc.kill()  # SIGKILL; not sent once is_alive() has reaped it, so never to a reused pid
        proc.join()
        killed = proc.exitcode == -signal.SIGKILL
        assert killed or proc.exitcode == 0, proc.exitcode
        return committed_at, killed, bool(staging_folders(target)), _marker_path(target) is not None

    reset()
    writing, *_ = trial(_save_child)  # unkilled: how long the save takes to reach its commit
    new_state = state(target, memo)
    reset()
    writing = min(writing, trial(_save_child)[0])  # the first one also warms caches up
    assert state(target, memo) == new_state
    assert set(new_state) - set(old_state) and set(old_state) - set(new_state)  # new shards, stale ones gone
    assert {k: new_state[k] for k in USER_FILES} == user_state()
    shutil.copytree(target, tmp_path / "new", copy_function=os.link)
    same_outputs(tmp_path / "new", new)
    same_outputs(reference, old)

    outcomes = []
    # before the commit (writing the staged files, flushing them, writing the marker), then while files move in
    kills = [{"delay": f * writing} for f in (0.02, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0)]
    kills += [{"after_marker": n * SLOW_MOVE} for n in (0, 1.5, 4.5, 9.5)]
    for kill in kills:
        reset()
        _, killed, staged, marked = trial(_save_child, **kill)
        if "after_marker" in kill and marked:
            # a recovery killed half-way is itself finished by the next one
            trial(_recover_child, delay=2.5 * SLOW_MOVE)
        transaction.recover(target)
        now = state(target, memo)
        assert now in (old_state, new_state), (kill, sorted(set(now) ^ set(old_state)))
        assert not staging_folders(target)
        if "after_marker" in kill:
            assert now == new_state, kill  # committed: rolled forward
        outcomes.append(("old" if now == old_state else "new", killed, staged, marked))
    # the kills hit every phase: writing (rolled back), moving (rolled forward)
    assert any(o[0] == "old" and o[1] and o[2] for o in outcomes), outcomes
    assert any(o[0] == "new" and o[1] and o[3] for o in outcomes), outcomes


def test_remote_code_is_the_engine_files_under_their_checkpoint_names(tmp_path):
    """The modeling code is several files; in a checkpoint each carries the modeling file's prefix and imports only
    torch, transformers and its prefixed siblings, so nothing resolves to a user's module or to hfprune."""
    target = tmp_path / "out"
    target.mkdir()
    write_user_files(target)
    tiny_bert(REMOTE).save_pretrained(target)
    written = sorted(p.name for p in target.glob("*.py"))
    assert written == sorted(CODE_FILES + ("structure_specs.py",)), written
    assert (target / "structure_specs.py").read_bytes() == USER_FILES["structure_specs.py"]
    for name in CODE_FILES:
        tree = ast.parse((target / name).read_text())
        nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        relative = {n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.level}
        absolute = {a.name.split(".")[0] for n in nodes if isinstance(n, ast.Import) for a in n.names}
        absolute |= {n.module.split(".")[0] for n in nodes if isinstance(n, ast.ImportFrom) and not n.level}
        assert relative <= {n[:-3] for n in CODE_FILES} - {name[:-3]}, (name, relative)
        if name == MODELING_FILE:
            assert relative == {n[:-3] for n in CODE_FILES} - {name[:-3]}, relative
        assert absolute <= {"__future__", "inspect", "json", "math", "os", "dataclasses", "torch", "transformers",
                            "safetensors"}, (name, absolute)
