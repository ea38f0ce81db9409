"""`python -m ipa_lib.cli` = `ipa` (what dvc.yaml's stages run)."""

import sys

from ipa_lib.cli import main

sys.exit(main())
