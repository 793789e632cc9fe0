"""``python -m optimlib.train.convert SRC DST``: write a single-process, FSDP2 or DeepSpeed ZeRO-1/2/3
checkpoint (any world size) as a single-engine checkpoint, e.g. to consolidate an FSDP2 or ZeRO
checkpoint for evaluation on one device.  The conversion itself is :mod:`optimlib.train.reshard`'s
and :mod:`optimlib.train.zero_checkpoint`'s (which ``resume`` uses by itself when a checkpoint was
written by another engine or world size); the files are checked first
(:mod:`optimlib.train.safe_load`), so a refused checkpoint writes nothing.  A checkpoint converted
from DeepSpeed keeps DeepSpeed's param groups (one per parameter for shape-aware optimizers) and
has no RNG state; optimlib's loaders regroup it by parameter name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from optimlib.train import checkpoint, reshard, zero_checkpoint


# ------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    """``python -m optimlib.train.convert SRC DST``: write checkpoint SRC as a single-engine one."""
    parser = argparse.ArgumentParser(description="Write an optimlib checkpoint (single, FSDP2 or DeepSpeed ZeRO) as a "
                                                 "single-engine checkpoint: one state.pt of full tensors.")
    parser.add_argument("src", type=Path, help="a checkpoint directory (…/checkpoints/step_XXXXXXXX)")
    parser.add_argument("dst", type=Path, help="the directory to create")
    parser.add_argument("--trusted", action="store_true",
                        help="read SRC without the safety checks (weights_only=False): only for a checkpoint you "
                             "trust like code (the launcher's resume_trusted=true)")
    args = parser.parse_args(argv)
    problem = checkpoint.verify(args.src)
    if problem is not None:
        print(f"error: '{args.src}' is not a usable checkpoint ({problem})", file=sys.stderr)
        return 1
    if args.dst.exists():
        print(f"error: '{args.dst}' exists; choose a new directory", file=sys.stderr)
        return 1
    manifest = checkpoint.read_manifest(args.src)
    try:
        if not args.trusted:
            checkpoint.check_files(args.src, manifest)
        read = zero_checkpoint.read_whole if manifest["engine"] == zero_checkpoint.ENGINE else reshard.read_whole
        state = read(args.src, manifest, trusted=args.trusted)
    except (checkpoint.CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    groups = state["optimizer"]["param_groups"]
    names = [n for group in groups for n in group["params"]]
    state["optimizer"] = reshard.keyed(state["optimizer"], names, by_name=False)
    state["meta"] = {**state["meta"], "engine": "single", "world_size": 1, "converted_from": manifest["engine"]}
    checkpoint.write_single(args.dst, state, run=manifest.get("run"))
    print(json.dumps({"src": str(args.src), "dst": str(args.dst), "from": manifest["engine"],
                      "world_size": manifest["world_size"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
