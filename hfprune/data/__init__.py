# Copyright hfprune contributors. Apache-2.0.
"""Data paths for the real offline assets (``benchmarks/install_assets.sh``) and generic helpers."""

from .assets import AssetMissing, asset_path, cache_dir
from .movie_reviews import movie_reviews

__all__ = ["AssetMissing", "asset_path", "cache_dir", "movie_reviews"]
