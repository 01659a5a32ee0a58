"""``alignkit merge ADAPTER_DIR OUT_DIR [--base BASE]``: merge a LoRA adapter into its base model."""
from __future__ import annotations

import argparse
import logging
import sys

from alignkit.models import merge_adapter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alignkit merge", description="merge a LoRA adapter into its base model")
    p.add_argument("adapter_dir")
    p.add_argument("out_dir")
    p.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", default="float32", help="dtype to merge and save in (default float32)")
    p.add_argument("--device", default="cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = merge_adapter(args.adapter_dir, args.out_dir, base=args.base, dtype=args.dtype, device=args.device)
    except (FileNotFoundError, ValueError) as err:
        print(f"alignkit merge: {err}", file=sys.stderr)
        return 2
    print(f"merged model saved to {out}")
    return 0
