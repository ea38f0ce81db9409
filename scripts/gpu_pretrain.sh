#!/usr/bin/env bash
# Pretrain the toy base on a lent GPU machine (device tool); same code path as `ipa pretrain`.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 - <<'PY'
import os
from ipa_lib.core.config import load_params
from ipa_lib.stages.pretrain import pretrain
p = load_params()
print(pretrain(p, os.environ["OUT"] + "/base", progress=False))
PY
