"""``stagewise export CHECKPOINT OUT_DIR``: a checkpoint as a Hugging Face model folder."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(verbs: Any) -> None:
    """Register ``export`` and its options on the verbs' subparsers."""
    parser = verbs.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face model folder (safetensors, tokenizer)",
        description=(
            "Write the model of a checkpoint, saved under any layout (pp, tp, dp, fsdp), as a "
            "Hugging Face folder: config.json, sharded safetensors with their index, and the "
            "tokenizer, so AutoModelForCausalLM.from_pretrained(OUT_DIR) loads it. The "
            "checkpoint must come from a run of --model FOLDER (its model files are kept in "
            "CHECKPOINT_DIR/model/). A LoRA run's checkpoint is written as a peft adapter "
            "folder (PeftModel.from_pretrained(base, OUT_DIR)), or with --merge as the base "
            "model with the adapters merged in."
        ),
    )
    parser.add_argument(
        "checkpoint", metavar="CHECKPOINT",
        help="a checkpoint folder (its newest complete step) or one step-NNNNNNNN folder",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (new or empty)")
    parser.add_argument("--force", action="store_true",
                        help="replace a Hugging Face model folder already at OUT_DIR")
    parser.add_argument("--max-shard-size", default="2GB", metavar="SIZE",
                        help="largest safetensors file, e.g. 2GB or 500MB (default 2GB)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the written weights (default float32, as trained)")
    parser.add_argument("--merge", action="store_true",
                        help="LoRA checkpoint: write the base with the adapters merged in (a "
                        "Hugging Face folder) instead of a peft adapter folder")
    parser.add_argument("--base", metavar="FOLDER", default=None,
                        help="LoRA --merge: the base model folder (default: the run's)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Export; print what was written. Bad input raises ConfigError (exit 2)."""
    from stagewise.cli._common import print_json
    from stagewise.runtime.checkpoint.export import export_checkpoint
    from stagewise.runtime.checkpoint.export_lora import export_lora, read_lora_spec

    options = {"force": args.force, "max_shard_size": args.max_shard_size, "dtype": args.dtype}
    if args.merge or args.base or read_lora_spec(args.checkpoint) is not None:
        done = export_lora(args.checkpoint, args.out_dir, merge=args.merge,
                           base_model=args.base, **options)
    else:
        done = export_checkpoint(args.checkpoint, args.out_dir, **options)
    if args.json:
        print_json({
            "checkpoint": str(done.checkpoint), "step": done.step, "out": str(done.out),
            "files": list(done.files), "num_tensors": done.num_tensors,
            "num_bytes": done.num_bytes,
        })
        return 0
    shards = sum(1 for name in done.files if name.endswith(".safetensors"))
    print(
        f"exported step {done.step} ({done.checkpoint}) to {done.out}: {done.num_tensors} "
        f"tensors, {done.num_bytes / 2**20:.1f} MiB in {shards} safetensors file(s)"
    )
    return 0
