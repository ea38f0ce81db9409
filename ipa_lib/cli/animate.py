"""`ipa wan-tiny OUT [--seed N] [--force]` and `ipa animate --model MODEL --case DIR --out clip.mp4`.

wan-tiny: a tiny random `WanAnimatePipeline` folder (`ipa_lib.models.wan_tiny`), for tests,
demos and CI; written to a temp folder and renamed into place; an existing non-empty OUT is
refused (exit 2) unless --force. animate: `ipa_lib.stages.animate.animate_case`; prints
what it wrote as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path


def cmd_wan_tiny(args) -> int:
    from ipa_lib.core.errors import InputError
    from ipa_lib.core.io import atomic_dir
    from ipa_lib.models.wan_tiny import save_tiny_pipeline

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise InputError(f"{out}: folder exists and is not empty (add --force to replace it)")
    with atomic_dir(out) as tmp:
        save_tiny_pipeline(tmp, seed=args.seed)
    print(out)
    return 0


def cmd_animate(args) -> int:
    from ipa_lib.core.config import load_params
    from ipa_lib.stages.animate import animate_case

    params = load_params(args.params, args.set)
    result = animate_case(params, args.model, args.case, args.out, adapter=args.adapter, seed=args.seed, steps=args.steps)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def add_commands(sub, add_params_args) -> None:
    """Register `wan-tiny` and `animate`; `add_params_args` is the CLI's `--params`/`--set` helper."""
    p = sub.add_parser("wan-tiny", help="write a tiny random WanAnimatePipeline folder (tests, demos, CI)",
                       description="Write a tiny random WanAnimatePipeline folder (model_index.json, loadable "
                       "offline with from_pretrained): the real classes, a few layers, random weights.")
    p.add_argument("out", metavar="OUT", help="folder to write")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default: 0; same seed, same weights)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    p.set_defaults(func=cmd_wan_tiny)

    p = sub.add_parser("animate", help="animate one case with a registered model or a base folder (+ adapter)",
                       description="Animate one case folder (src_ref.png, src_pose.mp4, src_face.mp4[, src_bg.mp4, "
                       "src_mask.mp4]) at data.height x data.width, data.frames frames at data.fps; writes the "
                       "clip and a strip (driver pose | clip) as <out stem>_strip.png.")
    p.add_argument("--model", required=True, metavar="MODEL",
                   help="models:/NAME@ALIAS or models:/NAME/VERSION, or a base model folder")
    p.add_argument("--adapter", metavar="DIR", help="LoRA adapter folder on top of a base folder (default: none)")
    p.add_argument("--case", required=True, metavar="DIR", help="case folder to animate")
    p.add_argument("--out", required=True, metavar="FILE", help="clip to write, e.g. clip.mp4")
    p.add_argument("--seed", type=int, help="generation seed (default: evaluate.seeds[0])")
    p.add_argument("--steps", type=int, help="denoising steps (default: evaluate.num_inference_steps)")
    add_params_args(p, "data.frames=17")
    p.set_defaults(func=cmd_animate)
