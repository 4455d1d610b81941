"""The LM text path: a seeded split by article, packing into fixed-length blocks, and the real BBC News asset."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hfprune.data import text
from hfprune.data.assets import AssetMissing


def _tokenizer(texts: list) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline from ``texts`` (no Hub)."""
    words = sorted({w for t in texts for w in t.split()})
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


# -- split --------------------------------------------------------------------------------------------------


def test_split_is_a_seeded_partition():
    a = text.split_articles(200, seed=3)
    assert a == text.split_articles(200, seed=3)  # deterministic
    assert a != text.split_articles(200, seed=4)
    everything = sorted(i for idx in a.values() for i in idx)
    assert everything == list(range(200))  # disjoint and complete
    assert (len(a["calibration"]), len(a["test"]), len(a["train"])) == (10, 20, 170)


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="sum to 1"):
        text.split_articles(100, fractions={"train": 0.5, "test": 0.1})
    with pytest.raises(ValueError, match="'train'"):
        text.split_articles(100, fractions={"test": 0.5, "calibration": 0.5})
    with pytest.raises(ValueError, match="at least 3 articles"):
        text.split_articles(2)


# -- packing ------------------------------------------------------------------------------------------------


def test_pack_concatenates_with_eos_and_drops_the_tail():
    blocks = text.pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], block_size=4, eos_id=0)
    # stream: 1 2 3 0 4 5 0 6 7 8 9 0  -> 3 full blocks
    assert blocks == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert text.pack([[1, 2, 3]], block_size=2) == [[1, 2]]
    with pytest.raises(ValueError, match="block_size=1"):
        text.pack([[1, 2]], block_size=1)


def test_lm_blocks_have_fixed_length_and_labels_equal_inputs():
    import datasets

    docs = ["the cat sat on the mat", "a dog ran far away today", "news of the day is here"]
    tok = _tokenizer(docs)
    data = datasets.Dataset.from_dict({"text": docs})
    blocks = text.lm_blocks(data, tok, block_size=5)
    assert len(blocks) == (6 + 6 + 6 + 3) // 5  # 6 words per article plus one EOS each
    row = blocks[0]
    assert row["input_ids"].shape == (5,) and row["attention_mask"].tolist() == [1] * 5
    assert row["labels"].tolist() == row["input_ids"].tolist()
    assert blocks[1]["input_ids"][1].item() == tok.eos_token_id  # first article ends at stream position 6
    assert len(text.lm_blocks(data, tok, block_size=5, max_blocks=2)) == 2
    with pytest.raises(ValueError, match="'text' column"):
        text.lm_blocks(data.rename_column("text", "body"), tok, block_size=5)
    with pytest.raises(ValueError, match="fewer than block_size"):
        text.lm_blocks(data, tok, block_size=1000)


# -- the real corpus ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bbc():
    try:
        return text.bbc_news(seed=0)
    except AssetMissing as err:
        pytest.skip(str(err))


def test_bbc_news_split_by_article(bbc):
    sizes = {name: len(split) for name, split in bbc.items()}
    assert sum(sizes.values()) == 2225
    assert sizes == {"calibration": 111, "test": 222, "train": 1892}
    # together the splits hold every article exactly once (a partition by article, not by block)
    everything = sorted(t for name in ("calibration", "train", "test") for t in bbc[name]["text"])
    assert everything == sorted(body for _, body in text.bbc_articles())
    assert set(bbc["test"]["topic"]) == {"business", "entertainment", "politics", "sports", "tech"}
    again = text.bbc_news(seed=0)
    assert again["test"]["text"] == bbc["test"]["text"]  # same split on every call
    assert text.bbc_news(seed=1)["test"]["text"] != bbc["test"]["text"]


def test_bbc_articles_read_in_sorted_order(tmp_path):
    for topic, name, body in [("b", "002.txt", "two"), ("a", "010.txt", "ten"), ("b", "001.txt", "one")]:
        (tmp_path / topic).mkdir(exist_ok=True)
        (tmp_path / topic / name).write_text(body)
    (tmp_path / "a" / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert text.bbc_articles(tmp_path) == [("a", "ten"), ("a", "café"), ("b", "one"), ("b", "two")]
    with pytest.raises(FileNotFoundError, match="no articles"):
        text.bbc_articles(tmp_path / "a")
