"""``stagewise train``: train a model with any schedule on local ranks (or under torchrun).

Locally it spawns one process per rank (gloo, CPU, nothing to set up). Started by torchrun, the
same command joins the group torchrun describes and rank 0 prints the report::

    torchrun --nnodes 2 --nproc-per-node 2 ... -m stagewise train

The flags, a ``--config`` file and its overrides all become one
:class:`~stagewise.runconfig.RunConfig` (see ``_train_flags``); ``stagewise.train`` runs it. At
the end it prints the measured bubble beside the simulator's prediction from the measured
per-stage costs, activation memory per rank measured and predicted, and writes the real run's
timeline (PNG), a Chrome trace and a memory plot to ``--out``. Exit codes: 0 ok, 1 the run
failed (the first error's rank and action are printed), 2 bad input, 128 + N the launcher
was stopped by signal N (its ranks ended).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from stagewise.cli._common import print_json
from stagewise.cli._deprecated import add_deprecated
from stagewise.errors import RuntimeFailure
from stagewise.schedules import names

__all__ = ["add_parser", "run"]


def add_parser(verbs: Any) -> None:
    """Register ``train``; every option defaults to None (not given: the file's or train's)."""
    parser = verbs.add_parser(
        "train",
        help="train a model through a pipeline schedule on local ranks (or torchrun)",
        description="Train a small GPT-style model (or a Hugging Face or your own model) on "
        "generated data with a pipeline schedule; compare the measured run with the "
        "simulator's prediction. Defaults: 1f1b, 4 ranks (torchrun: its world size), 8 "
        "micro-batches, 16 sequences of 32 tokens, 30 steps; a --config file's values replace "
        "these defaults and flags given beside it override the file.",
    )
    _add_run_options(parser)
    _add_model_options(parser)
    _add_data_options(parser)
    _add_checkpoint_options(parser)
    _add_output_options(parser)
    parser.set_defaults(run=run)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument("-s", "--schedule",
                       help=f"registered schedule (default 1f1b): {', '.join(names())}")
    which.add_argument("--schedule-file", metavar="FILE.csv",
                       help="a schedule as CSV, one row of actions such as 2F0 per rank")
    parser.add_argument("-p", "--ranks", type=int, help="pipeline ranks p (default 4)")
    parser.add_argument("-m", "--microbatches", type=int,
                        help="micro-batches per replica and step m (default 8)")
    parser.add_argument("-v", "--chunks", type=int,
                        help="chunks (virtual stages) per rank v, for interleaved schedules")
    parser.add_argument("--mesh", metavar="AXES",
                        help="3D parallelism, e.g. pp=2,dp=2,tp=2: pp ranks per pipeline "
                        "(the schedule's ranks), dp replicas each on its share of "
                        "--global-batch, tp ranks sharding every transformer block; starts "
                        "pp*dp*tp ranks. fsdp=N instead of dp=N shards parameters, gradients "
                        "and optimizer state over the replicas (FSDP2)")
    parser.add_argument("--config", metavar="RUN.toml",
                        help="run a configuration written by `stagewise plan --emit-config`; "
                        "flags given here as well override the file's")
    batch = parser.add_argument_group("batch and optimisation")
    batch.add_argument("--global-batch", type=int,
                       help="sequences per step over all replicas (default 16)")
    add_deprecated(batch, "--batch-size", "--global-batch", type=int)
    batch.add_argument("--seq-len", type=int, help="tokens per sequence (default 32)")
    batch.add_argument("--steps", type=int, help="optimizer steps (default 30)")
    batch.add_argument("--lr", type=float, help="AdamW learning rate (default 3e-3)")
    batch.add_argument("--recompute", action=argparse.BooleanOptionalAction,
                       help="full activation recomputation: each layer keeps only its input "
                       "and runs its forward again in backward")
    batch.add_argument("--partition", choices=("even", "params", "time"),
                       help="how layers are cut into stages (default params)")
    batch.add_argument("--check-finite", action="store_true", default=None,
                       help="stop every rank at the first NaN or infinite loss")
    batch.add_argument("--seed", type=int, help="model and data seed (default 0)")
    batch.add_argument("--weight-decay", type=float,
                       help="AdamW weight decay on weights, not norms or biases (default 0.01)")
    batch.add_argument("--clip-grad", type=float, metavar="NORM",
                       help="clip gradients to this global norm over every rank")
    batch.add_argument("--lr-schedule", metavar="constant|cosine|linear",
                       help="learning-rate decay after the warm-up (default constant)")
    batch.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 0)")
    batch.add_argument("--grad-accum", type=int, metavar="K",
                       help="accumulate K batches per optimizer step (default 1)")
    batch.add_argument("--lora", metavar="SPEC",
                       help="train LoRA adapters only (peft), e.g. r=16,alpha=32,dropout=0.05,"
                       "targets=q_proj,k_proj,v_proj,o_proj (model folders)")
    batch.add_argument("--tensorboard", metavar="DIR",
                       help="write per-step metrics as TensorBoard event files here")
    batch.add_argument("--metrics", metavar="FILE.jsonl",
                       help="write per-step metrics as JSON lines here")
    batch.add_argument("--dtype", metavar="fp32|bf16",
                       help="fp32 (default) or bf16: compute, activations and pipeline transfers "
                       "in bf16 (autocast), weights and optimizer state in fp32")
    launch = parser.add_argument_group("processes")
    launch.add_argument("--device", choices=("cpu", "cuda"),
                        help="cpu (default; gloo) or cuda: one GPU per rank (GPU LOCAL_RANK "
                        "under torchrun), NCCL for data and tensor parallelism, pipeline "
                        "transfers through host memory over gloo")
    launch.add_argument("--timeout", type=float,
                        help="seconds any wait for another rank may take (default 60)")
    launch.add_argument("--threads", type=int, help="torch threads per rank (default 1)")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model", metavar="SPEC",
                       help="a local Hugging Face model folder (config.json, safetensors "
                       "weights, tokenizer: its weights are trained), tiny (default: the tiny "
                       "GPT of --dim/--layers), hf:llama, hf:gpt2 (Hugging Face, random "
                       "weights from --seed) or py:package.module:function (your nn.Module, "
                       "cut by --split); nothing is downloaded")
    model.add_argument("--model-config", metavar="FILE.json",
                       help="Hugging Face config.json for hf: models (default: a tiny config)")
    model.add_argument("--split", metavar="NAMES",
                       help="py: models: comma-separated submodule names in the order they "
                       "run, e.g. embed,blocks,head (a ModuleList name stands for its children)")
    model.add_argument("--dim", type=int, help="tiny GPT width (default 64)")
    model.add_argument("--layers", type=int, help="tiny GPT transformer blocks (default 6)")
    model.add_argument("--heads", type=int,
                       help="tiny GPT attention heads (default 4, or 1 when --dim is not a "
                       "multiple of 4)")


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "data", "your data instead of generated sequences: .txt, .jsonl/.json (text, "
        "prompt+completion or chat messages), .parquet, .arrow; tokenised with the model "
        "folder's tokenizer, packed into --seq-len sequences, cached")
    group.add_argument("--data", action="append", metavar="PATH",
                       help="a file or folder to train on (repeat for more)")
    group.add_argument("--eval-data", action="append", metavar="PATH",
                       help="a file or folder to evaluate on (repeat for more): eval loss and "
                       "perplexity at the end and every --eval-every steps")
    group.add_argument("--eval-every", type=int, metavar="N",
                       help="evaluate every N steps (default: at the end only)")
    group.add_argument("--tokenizer", metavar="DIR",
                       help="the tokenizer's folder (default: the model folder's)")
    group.add_argument("--data-cache", metavar="DIR",
                       help="where tokenised data is cached (default $XDG_CACHE_HOME/stagewise)")


def _add_checkpoint_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpoints")
    group.add_argument("--checkpoint-dir", metavar="DIR",
                       help="where checkpoints are written and read (torch.distributed."
                       "checkpoint, one folder per step, keyed by model layer: any layout can "
                       "resume it)")
    group.add_argument("--save-every", type=int, metavar="N",
                       help="write a checkpoint after every N steps (default 0: never)")
    group.add_argument("--keep", type=int, metavar="K",
                       help="keep only the newest K checkpoints (default: all)")
    group.add_argument("--resume", action="store_true", default=None,
                       help="continue from the newest checkpoint in --checkpoint-dir, checked "
                       "file by file (same data and losses as a run that was never stopped)")
    group.add_argument("--resume-from", type=int, metavar="STEP",
                       help="continue from step STEP's checkpoint (e.g. the newest complete one "
                       "when --resume refuses a damaged newest checkpoint)")
    group.add_argument("--export-hf", metavar="OUT_DIR",
                       help="at the end, write the trained model as a Hugging Face folder "
                       "(as `stagewise export` does; --model FOLDER runs only)")


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", metavar="DIR", default="stagewise-train",
                       help="where the pictures and trace go (default stagewise-train)")
    group.add_argument("--no-plots", action="store_true", help="write no files")
    group.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    """Build the run from the flags (and ``--config``), check it, train, report."""
    import os

    from stagewise.cli._train_flags import run_config
    from stagewise.runtime.engine.failure import Interrupted
    from stagewise.runtime.engine.launch import in_torchrun
    from stagewise.train import prepare, train

    torchrun = in_torchrun()
    job = prepare(run_config(args, torchrun), progress=not args.json)
    if not args.json and (not torchrun or os.environ.get("RANK") == "0"):
        _print_header(job)
    try:
        with _lock(job, torchrun):
            report = train(job, torchrun)
    except RuntimeFailure as err:
        print(f"stagewise: training failed: {err}", file=sys.stderr)
        return 128 + err.signal if isinstance(err, Interrupted) else 1
    if report is None:
        return 0  # a torchrun rank other than 0
    written = [] if args.no_plots else _write_files(report, Path(args.out))
    if args.json:
        payload = report.as_json()
        payload["files"] = written
        print_json(payload)
    else:
        _print_report(report, written)
    return 0


def _lock(job: Any, torchrun: bool) -> Any:
    """The checkpoint folder's lock for the run (taken by the launcher, or torchrun's global
    rank 0), or nothing without checkpoints."""
    import contextlib
    import os

    from stagewise.runtime.checkpoint.lock import checkpoint_lock

    folder = job.config.checkpoint.dir
    if folder is None or job.temporary_checkpoints or (
            torchrun and os.environ.get("RANK") != "0"):
        return contextlib.nullcontext()
    return checkpoint_lock(folder, os.environ.get("TORCHELASTIC_RUN_ID"))


def _print_header(job: Any) -> None:
    from stagewise.runtime.models.tiny_gpt import GPTConfig

    config, s = job.config, job.schedule
    model, batch, mesh = config.model, config.batch, config.mesh
    what = (
        f"a tiny GPT ({model.layers} blocks, width {model.dim}, vocab {GPTConfig.vocab})"
        if model.spec == "tiny" else f"{model.spec} ({job.num_layers} layers)"
    )
    recompute = " with recomputation" if config.training.recompute == "full" else ""
    print(
        f"training {what}{recompute} with {s.name}: {s.num_ranks} ranks, {s.num_stages} stages, "
        f"{s.num_microbatches} micro-batches, {batch.global_batch} x {batch.seq_len} tokens "
        f"per step, {config.training.steps} steps"
        + ("" if mesh.world_size == mesh.pp and not mesh.dp_shard else
           f", mesh {mesh.text().replace(',', ' x ')} ({mesh.world_size} processes, "
           f"{job.rows_per_replica} sequences per replica)")
        + (", one GPU per rank" if config.launch.device == "cuda" else ""),
        flush=True,
    )


def _mib(value: float) -> str:
    return f"{value / 2**20:.2f} MiB"


def _print_report(report: Any, written: list[str]) -> None:
    losses, steps = report.losses, report.step_seconds
    print(f"loss: {losses[0]:.4f} at step 1 -> {losses[-1]:.4f} at step {len(losses)}")
    ordered = sorted(steps[1:])
    print(f"step time: median {ordered[len(ordered) // 2]:.3f} s "
          f"(with the optimizer), {report.tokens_per_second:,.0f} tokens/s")
    gap = report.measured_step / report.predicted_step - 1 if report.predicted_step else 0.0
    print(f"pipeline step (first action to last): measured {report.measured_step * 1e3:.1f} ms, "
          f"predicted {report.predicted_step * 1e3:.1f} ms from the measured per-stage costs "
          f"and link latency ({report.link_latency * 1e3:.2f} ms) ({gap:+.1%})")
    for key, label in (("of_step", "idle share of the step"),
                       ("vs_ideal", "relative to ideal compute")):
        print(f"bubble, {label}: measured {report.measured_bubble[key]:.1%}, "
              f"predicted {report.predicted_bubble[key]:.1%}")
    print("activation memory per rank (bytes saved for backward, peak): measured / predicted")
    for rank, (measured, predicted) in enumerate(
        zip(report.measured_activation_bytes, report.predicted_activation_bytes, strict=True)
    ):
        print(f"  rank {rank}: {_mib(measured)} / {_mib(predicted)}")
    for entry in report.eval:
        print(f"eval after step {entry['step']:.0f}: loss {entry['loss']:.4f}, perplexity "
              f"{entry['perplexity']:.2f}")
    for path in written:
        print(f"wrote {path}")
    if report.exported is not None:
        print(f"exported the trained model to {report.exported} (a Hugging Face folder)")


def _write_files(report: Any, folder: Path) -> list[str]:
    from stagewise.viz import compare_timelines, plot_memory, plot_timeline, write_chrome_trace

    folder.mkdir(parents=True, exist_ok=True)
    paths = [
        plot_timeline(report.timeline, folder / "timeline.png",
                      title=f"measured run of {report.schedule}"),
        compare_timelines(report.predicted, report.timeline, folder / "predicted-vs-measured.png"),
        plot_memory(report.timeline, folder / "memory.png", in_bytes=True),
        write_chrome_trace(report.timeline, folder / "trace.json"),
    ]
    return [str(p) for p in paths]
