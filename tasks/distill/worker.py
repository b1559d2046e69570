"""Entry point that torchrun starts once per process: run the distill stage as one rank.

    torchrun --nproc-per-node 2 -m tasks.distill.worker \\
        --student runs/x/01-prune/model --teacher ~/.cache/pkdq/models/smollm2-135m \\
        --config distill.json --out runs/x/02-distill --strategy ddp --device cpu

Every rank runs `tasks.distill.stage.distill_stage` with its `Runtime`; rank 0 writes the stage's
outputs into `--out` and the StageResult (model ref + metrics) as JSON into `--result`, which the
launching process (`tasks.distill.launch`) reads back. `pkdq` builds this command itself from a
recipe's
`resources:` section; running it by hand is for debugging.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tasks.core.common import StageContext, data_dir, set_offline_env, write_json_atomic
from tasks.distill.distributed import STRATEGIES

RESULT_FILE = "launch/result.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tasks.distill.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True, type=Path, help="student model folder")
    parser.add_argument("--teacher", required=True, type=Path, help="teacher model folder")
    parser.add_argument("--config", required=True, type=Path, help="DistillConfig as JSON")
    parser.add_argument("--out", required=True, type=Path, help="the stage folder")
    parser.add_argument("--result", type=Path, help=f"default: OUT/{RESULT_FILE}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--data", type=Path, help="data folder (default: PKDQ_DATA_DIR)")
    parser.add_argument("--stage-name", default="distill")
    parser.add_argument("--strategy", choices=STRATEGIES, default="ddp")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_offline_env()
    from tasks.core.model_folder import model_ref
    from tasks.core.recipe import DistillConfig
    from tasks.distill.distributed import Runtime
    from tasks.distill.stage import distill_stage

    cfg = DistillConfig.model_validate(json.loads(args.config.read_text()))
    runtime = Runtime.start(args.strategy, args.device)
    try:
        ctx = StageContext(out_dir=args.out.resolve(), seed=args.seed, threads=args.threads,
                           data=args.data or data_dir(), teacher=model_ref(args.teacher),
                           stage_name=args.stage_name)
        result = distill_stage(model_ref(args.student), cfg, ctx, runtime=runtime)
        if runtime.is_main:
            write_json_atomic(args.result or args.out / RESULT_FILE,
                              {"model": result.model.to_json(), "metrics": result.metrics,
                               "world_size": runtime.world, "strategy": runtime.strategy,
                               "device": runtime.device})
    finally:
        runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
