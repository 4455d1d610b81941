"""Offline asset paths and the seeded movie-review split every benchmark and recipe shares."""

import pytest

from hfprune.data import AssetMissing, asset_path, cache_dir, movie_reviews


def test_asset_path_names_the_package_and_the_fix():
    with pytest.raises(AssetMissing, match="no_such_pkg_xyz/model.*install_assets.sh"):
        asset_path("no_such_pkg_xyz", "model")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HFPRUNE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path


def test_missing_sentences_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("HFPRUNE_CACHE", str(tmp_path))
    with pytest.raises(AssetMissing, match="movieReviewSnippets_GroundTruth.txt.*install_assets.sh"):
        movie_reviews()


@pytest.mark.slow
def test_movie_review_split_is_fixed_disjoint_and_complete():
    try:
        data = movie_reviews(seed=0)
    except AssetMissing as e:
        pytest.skip(str(e))
    sizes = {k: len(v) for k, v in data.items()}
    assert sizes == {"train": 8454, "validation": 1056, "test": 1058}  # 10,568 polar sentences, 80/10/10
    texts = {k: list(v["text"]) for k, v in data.items()}
    assert not set(texts["train"]) & set(texts["test"])  # no test sentence is seen in training
    assert not set(texts["train"]) & set(texts["validation"])
    assert texts["test"] == movie_reviews(seed=0)["test"]["text"]  # the same split every time
    assert texts["test"] != movie_reviews(seed=1)["test"]["text"]
    assert set(data["train"]["label"]) == {0, 1}
    assert 0.4 < sum(data["test"]["label"]) / sizes["test"] < 0.6
