"""`python -m ipa_lib.cli` = `ipa` (what dvc.yaml's stages run)."""

import os
import sys

if not sys.stderr.isatty():  # a log file or a pipe (`dvc repro 2> log`, CI): a frame every 10 s, ASCII bars;
    # read by tqdm when it is first imported (a TQDM_* variable already set wins)
    os.environ.setdefault("TQDM_MININTERVAL", "10")
    os.environ.setdefault("TQDM_ASCII", " 123456789#")

from ipa_lib.cli import main  # noqa: E402

sys.exit(main())
