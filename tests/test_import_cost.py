"""``import hfprune`` and ``hfprune --help`` stay cheap: no torch, transformers, datasets or matplotlib."""

import json
import subprocess
import sys
import time

HEAVY = ("torch", "transformers", "datasets", "matplotlib")


def _loaded_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; which heavy modules it left in ``sys.modules``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_hfprune_loads_no_heavy_module():
    assert _loaded_after("import hfprune") == dict.fromkeys(HEAVY, False)


def test_cli_help_loads_no_heavy_module():
    code = "import contextlib, io, hfprune.pipeline.cli\nwith contextlib.redirect_stdout(io.StringIO()):\n" \
           "    assert hfprune.pipeline.cli.main(['--help']) == 0"
    assert _loaded_after(code) == dict.fromkeys(HEAVY, False)


def test_python_m_hfprune_help_is_fast():
    # A property of the import graph, not a benchmark: the bound is loose (torch alone takes seconds to import),
    # and the best of three runs absorbs a busy machine.
    times = []
    for _ in range(3):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "hfprune", "--help"], capture_output=True, text=True, timeout=60)
        times.append(time.perf_counter() - start)
        assert out.returncode == 0 and "hfprune run" in out.stdout
    best = min(times)
    print(f"python -m hfprune --help: best of 3 {best:.3f} s")
    assert best < 2.0, f"python -m hfprune --help took {best:.2f} s (best of 3); something heavy is imported"
