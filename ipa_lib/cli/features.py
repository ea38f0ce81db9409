"""`ipa features`: train the toy-world feature extractors used for Frechet distances."""

from __future__ import annotations

import json


def add_command(sub) -> None:
    p = sub.add_parser("features", help="train the toy-world feature extractors used for Frechet distances (ipa report)")
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param, e.g. toy.size=32")
    p.add_argument("--out", default="models/features", help="folder for the extractors (default: models/features)")
    p.add_argument("--corpus-size", type=int, default=1536, help="toy clips to train on (default: 1536)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per extractor (default: 300)")
    p.set_defaults(func=cmd_features)


def cmd_features(args) -> int:
    from ipa_lib.analysis.features import train_extractors
    from ipa_lib.core.config import load_params

    params = load_params(args.params, args.set)
    result = train_extractors(args.out, params.toy.frames, params.toy.size, params.toy.motion,
                              corpus_size=args.corpus_size, steps=args.steps)
    print(json.dumps({k: v.cfg.train for k, v in result.items()}, indent=2))
    return 0
