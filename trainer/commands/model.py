"""`openrft model tiny --out DIR [--seed N]` | `openrft model smollm2 --out DIR`: build a local
model directory (no model hub)."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str]) -> int:
    """`openrft model tiny --out DIR [--seed N]` | `openrft model smollm2 --out DIR`."""
    parser = argparse.ArgumentParser(prog="openrft model", description="build a local model directory")
    parser.add_argument("kind", choices=["tiny", "smollm2"], help="which model to build")
    parser.add_argument("--out", required=True, type=Path, help="directory to write the model to")
    parser.add_argument("--seed", type=int, default=0, help="seed (tiny only)")
    args = parser.parse_args(argv)
    if args.kind == "tiny":
        from trainer.models.tiny import build_tiny_model

        path = build_tiny_model(args.out, seed=args.seed)
    else:
        from trainer.models.smollm2 import convert_smollm2

        path = convert_smollm2(args.out)
    print(path)
    return 0
