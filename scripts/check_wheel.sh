#!/usr/bin/env bash
# The wheel a user installs: built from this tree and installed into a fresh virtualenv, it must carry the
# bundled nano weights, the annotator's page and the sample photo, and run the main job.
# Run inside the test environment (scripts/test.sh): the fresh virtualenv borrows that environment's
# installed dependencies (torch, ...) through a path entry, so nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python -m build --wheel --outdir "$tmp/dist" . >"$tmp/build.log" 2>&1 || { cat "$tmp/build.log"; exit 1; }
python -m venv "$tmp/venv"
deps="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
site="$("$tmp/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# A plain path entry: the editable install's own .pth hooks in $deps are not run, so `samkit` is the wheel's.
echo "$deps" >"$site/zz_test_deps.pth"
"$tmp/venv/bin/python" -m pip install -q --no-deps --no-index "$tmp"/dist/samkit-*.whl
cd "$tmp"
export SAMKIT_HOME="$tmp/home"
"$tmp/venv/bin/python" - <<'PY'
from pathlib import Path

import samkit

pkg = Path(samkit.__file__).parent
assert "/venv/" in str(pkg), f"samkit was imported from {pkg}, not from the wheel"
for rel in ["weights/samkit_nano.safetensors", "annotate/static/index.html", "annotate/static/app.js", "data/coffee.jpg"]:
    assert (pkg / rel).is_file(), f"the wheel lacks samkit/{rel}"
PY
"$tmp/venv/bin/samkit" models | grep -E '^nano +.* True +bundled' >/dev/null || { echo "samkit models: nano is not bundled"; exit 1; }
"$tmp/venv/bin/samkit" segment "$("$tmp/venv/bin/samkit" sample)" --point 365,285 --model nano --out "$tmp/out"
test -s "$tmp/out/coffee_mask_0000.png" && test -s "$tmp/out/coffee_overlay.png"
echo "wheel ok: $(basename "$tmp"/dist/samkit-*.whl)"
