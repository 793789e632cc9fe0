"""Pretrain a LLaMA-style model with any optimlib optimizer.

    python launch/pretrain.py --config configs/default.yaml optim.lr=3e-3 train.steps=300
    torchrun --nproc_per_node 2 launch/pretrain.py --config configs/default.yaml      # FSDP2
    deepspeed --num_gpus 2 launch/pretrain.py --config configs/default.yaml deepspeed.zero_stage=2

Overrides are dotted ``key=value`` pairs (docs/training.md, "Config reference").

Resuming (docs/checkpoints.md): ``resume=auto`` continues the newest checkpoint in ``out_dir``
and does nothing for a finished run ("already at step N"); every checkpoint file is checked
before it is loaded (``resume_trusted=true`` skips that); a new run refuses an ``out_dir`` that
holds another run's outputs unless ``overwrite=true``.
"""

from __future__ import annotations

import argparse
import sys

from optimlib.data import DataError
from optimlib.distributed.teardown import exit_process, launched_distributed
from optimlib.train.checkpoint import CheckpointError
from optimlib.train.config import ConfigError, load_config
from optimlib.train.engine import NonFiniteGradientError
from optimlib.train.loop import pretrain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML run config (defaults apply when omitted)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; not for users")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        pretrain(cfg, local_rank=args.local_rank)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteGradientError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    if launched_distributed():
        exit_process(code)  # see optimlib.distributed.teardown: avoids an abort at finalization
    sys.exit(code)
