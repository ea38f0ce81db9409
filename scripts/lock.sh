#!/usr/bin/env bash
# Re-resolve the three hash-pinned locks from pyproject.toml (uv; `pip install uv` anywhere):
#   requirements.lock       runtime: [project] dependencies + [cluster] + [wan] (the image, `make setup`)
#   requirements-test.lock  [test] on top: `-r requirements.lock` + only what the tests add
#   requirements-mlflow.lock  the MLflow server image alone (mlflow + psycopg2-binary at the same pins)
# torch is resolved as the CPU wheel (its dependencies are locked) but not written: its file
# differs per variant (+cpu, +cu128), so a hash cannot pin it; `make setup` and the image install
# torch==<pyproject's pin> first. Existing pins are kept unless pyproject.toml needs others
# (uv prefers the versions already in the output file; `--upgrade` to move them).
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}
TORCH_WHEELS=${TORCH_WHEELS:-/opt/wheels}   # a folder holding torch-<pin>+cpu-*.whl
torch_pin=$(python3 -c "import tomllib; print(next(d for d in tomllib.load(open('pyproject.toml','rb'))['project']['dependencies'] if d.startswith('torch==')).split('==')[1])")
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
echo "torch==${torch_pin}+cpu" > "$tmp/torch-cpu.txt"
common=(--quiet --python-version 3.11 --generate-hashes --no-emit-package torch --override "$tmp/torch-cpu.txt"
        --find-links "$TORCH_WHEELS" --custom-compile-command "bash scripts/lock.sh" "$@")

"$UV" pip compile pyproject.toml --extra cluster --extra wan "${common[@]}" -o requirements.lock
note="# torch is not in this file (its wheel differs per variant: +cpu, +cu128): install it first, at pyproject's pin (${torch_pin})"
awk -v note="$note" '!done && !/^#/ { print note; done = 1 } { print }' requirements.lock > "$tmp/runtime.lock"
cp "$tmp/runtime.lock" requirements.lock

# the test lock: everything, constrained to the runtime pins, minus what requirements.lock has
skip=()
while read -r name; do skip+=(--no-emit-package "$name"); done < <(sed -n 's/^\([A-Za-z0-9._-]*\)==.*/\1/p' requirements.lock)
[ -f requirements-test.lock ] && grep -v '^-r ' requirements-test.lock > "$tmp/test.lock"  # keep its pins too
"$UV" pip compile pyproject.toml --extra test -c requirements.lock "${common[@]}" "${skip[@]}" -o "$tmp/test.lock"
# the header (uv's leading comment lines), then the runtime lock, then the test additions
awk '!done && !/^#/ { print "-r requirements.lock"; done = 1 } { print }' "$tmp/test.lock" > requirements-test.lock

# the MLflow server image (k8s/mlflow/Dockerfile): mlflow + the Postgres driver at the runtime pins, no torch
mlflow_pin=$(sed -n 's/^mlflow==\([^ ]*\).*/\1/p' requirements.lock)
printf 'mlflow==%s\npsycopg2-binary\n' "$mlflow_pin" > "$tmp/mlflow.in"
"$UV" pip compile "$tmp/mlflow.in" -c requirements.lock "${common[@]}" -o requirements-mlflow.lock
