"""``stagewise train``: train a tiny GPT with any schedule on local ranks (or under torchrun).

Locally it spawns one process per rank (gloo, CPU, nothing to set up). Started by torchrun, the
same command joins the group torchrun describes and rank 0 prints the report::

    torchrun --nnodes 2 --nproc-per-node 2 ... -m stagewise train

At the end it prints the measured bubble beside the simulator's prediction from the measured
per-stage costs, activation memory per rank measured and predicted, and writes the real run's
timeline (PNG), a Chrome trace and a memory plot to ``--out``. Exit codes: 0 ok, 1 the run
failed (the first error's rank and action are printed), 2 bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from stagewise.cli._common import add_schedule_options, print_json, schedule_from_args
from stagewise.errors import ConfigError, RuntimeFailure

__all__ = ["add_parser", "run"]


def add_parser(verbs: Any) -> None:
    parser = verbs.add_parser(
        "train",
        help="train a tiny GPT through a pipeline schedule on local ranks (or torchrun)",
        description="Train a small GPT-style model on generated data with a pipeline schedule; "
        "compare the measured run with the simulator's prediction. Defaults: 1f1b, 4 ranks "
        "(torchrun: its world size), 8 micro-batches; a --schedule-file gives its own sizes.",
    )
    add_schedule_options(parser)
    parser.set_defaults(ranks=None, microbatches=None)  # 4 and 8 unless a file says otherwise
    parser.add_argument("--mesh", metavar="AXES", default=None,
                        help="3D parallelism, e.g. pp=2,dp=2,tp=2: pp ranks per pipeline "
                        "(the schedule's ranks), dp replicas each on its share of --batch-size, "
                        "tp ranks sharding every transformer block; starts pp*dp*tp ranks. "
                        "fsdp=N instead of dp=N shards parameters, gradients and optimizer "
                        "state over the replicas (FSDP2)")
    parser.add_argument("--config", metavar="RUN.toml", default=None,
                        help="run a configuration written by `stagewise plan --emit-config`; "
                        "flags given here as well override the file's")
    parser.add_argument("--model", default="tiny", metavar="SPEC",
                        help="tiny (default: the tiny GPT of --dim/--layers), hf:llama, hf:gpt2 "
                        "(Hugging Face, random weights from --seed, nothing downloaded) or "
                        "py:package.module:function (your nn.Module, cut by --split)")
    parser.add_argument("--model-config", metavar="FILE.json", default=None,
                        help="Hugging Face config.json for hf: models (default: a tiny config)")
    parser.add_argument("--split", metavar="NAMES", default=None,
                        help="py: models: comma-separated submodule names in the order they "
                        "run, e.g. embed,blocks,head (a ModuleList name stands for its children)")
    parser.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=False,
                        help="full activation recomputation: each layer keeps only its input and "
                        "runs its forward again in backward")
    parser.add_argument("--checkpoint-dir", metavar="DIR", default=None,
                        help="where checkpoints are written and read (torch.distributed.checkpoint"
                        ", one folder per step, keyed by model layer: any layout can resume it)")
    parser.add_argument("--save-every", type=int, default=0, metavar="N",
                        help="write a checkpoint after every N steps (default 0: never)")
    parser.add_argument("--keep", type=int, default=None, metavar="K",
                        help="keep only the newest K checkpoints (default: all)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in --checkpoint-dir "
                        "(same data and losses as a run that was never stopped)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (default; gloo) or cuda: one GPU per rank (GPU LOCAL_RANK "
                        "under torchrun), NCCL for data and tensor parallelism, pipeline "
                        "transfers through host memory over gloo")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="sequences per step (default 16)")
    parser.add_argument("--seq-len", type=int, default=32,
                        help="tokens per sequence (default 32)")
    parser.add_argument("--dim", type=int, default=64, help="model width (default 64)")
    parser.add_argument("--layers", type=int, default=6, help="transformer blocks (default 6)")
    parser.add_argument("--heads", type=int, default=None,
                        help="attention heads of the tiny GPT (default 4, or 1 when --dim is "
                        "not a multiple of 4)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    parser.add_argument("--partition", choices=("even", "params", "time"), default="params",
                        help="how layers are cut into stages (default params)")
    parser.add_argument("--check-finite", action="store_true",
                        help="stop every rank at the first NaN or infinite loss")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds any wait for another rank may take (default 60)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", metavar="DIR", default="stagewise-train",
                        help="where the pictures and trace go (default stagewise-train)")
    parser.add_argument("--no-plots", action="store_true", help="write no files")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from stagewise.runtime.launch import in_torchrun

    torchrun = in_torchrun()
    if args.config is not None:
        args = _apply_run_config(args)
    mesh = _mesh(args, torchrun)
    if args.ranks is None and (torchrun or not args.schedule_file):
        args.ranks = int(os.environ["WORLD_SIZE"]) if torchrun else 4
    if args.microbatches is None and not args.schedule_file:
        args.microbatches = 8
    config = _config(args, mesh)
    if not args.json and (not torchrun or os.environ.get("RANK") == "0"):
        _print_header(config)
    try:
        report = _train_torchrun(config, args) if torchrun else _train_local(config, args)
    except RuntimeFailure as err:
        print(f"stagewise: training failed: {err}", file=sys.stderr)
        return 1
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


def _apply_run_config(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the ``--config`` file's settings as the defaults: a flag given on the
    command line wins, even when its value equals train's own default."""
    from stagewise.runconfig import load_run_config

    config = load_run_config(args.config)
    given = _given_flags(args)
    defaults = config.train_defaults()
    parser, train = _train_parser()
    own = vars(parser.parse_args(["train"]))  # train's defaults without the file
    if "schedule" in given and "chunks" not in given and args.schedule != config.schedule.name:
        defaults["chunks"] = None  # the file's v belongs to the file's schedule
    if "schedule_file" in given:  # a schedule file replaces the file's schedule and sizes
        defaults.update(schedule=None, chunks=None, microbatches=None)
    if "model" in given and args.model != config.model.spec:  # another model: not its shape
        for key in ("model_config", "split", "dim", "layers", "heads"):
            defaults[key] = own[key]
    train.set_defaults(**defaults)
    merged = parser.parse_args(["train", *_argv_after_verb(args)])
    for key in given:  # without argv (run() called directly) the flags come from args
        setattr(merged, key, getattr(args, key))
    merged.argv = getattr(args, "argv", None)
    merged.mesh_from_file = "mesh" not in given
    return merged


def _train_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """A fresh parser with the train verb alone, and train's own sub-parser."""
    parser = argparse.ArgumentParser(prog="stagewise", add_help=False)
    verbs = parser.add_subparsers()
    add_parser(verbs)
    return parser, verbs.choices["train"]


def _argv_after_verb(args: argparse.Namespace) -> list[str]:
    argv = list(getattr(args, "argv", None) or ())
    return argv[argv.index("train") + 1:] if "train" in argv else []


def _given_flags(args: argparse.Namespace) -> set[str]:
    """The argparse dests the command line set explicitly (a second parse with no defaults)."""
    parser, train = _train_parser()
    if getattr(args, "argv", None) is None:  # called without cli(): compare with the defaults
        defaults = vars(parser.parse_args(["train"]))
        return {k for k, v in vars(args).items() if k in defaults and v != defaults[k]}
    train._defaults.clear()
    for action in train._actions:
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(["train", *_argv_after_verb(args)]))
    return set(given) - {"config"}


def _mesh(args: argparse.Namespace, torchrun: bool) -> Any:
    """The parsed ``--mesh`` (None without one); sets ``args.ranks`` to its pp size."""
    if args.mesh is None:
        return None
    from stagewise.runtime.mesh import MeshSpec

    world = int(os.environ["WORLD_SIZE"]) if torchrun else None
    spec = MeshSpec.parse(args.mesh, world)
    if args.ranks is not None and args.ranks != spec.pp:
        source = (f"the mesh {args.mesh} of {args.config}" if getattr(args, "mesh_from_file", False)
                  else f"--mesh {args.mesh}")
        raise ConfigError(
            f"-p {args.ranks} disagrees with {source} (pp={spec.pp}): drop -p, or give "
            f"--mesh with pp={args.ranks}; the mesh's pp is the pipeline's ranks"
        )
    if not args.schedule_file:
        args.ranks = spec.pp
    return spec


def _config(args: argparse.Namespace, mesh: Any = None) -> Any:
    from stagewise.runtime.demo import TrainConfig
    from stagewise.runtime.tiny_gpt import GPTConfig

    for name in ("steps", "batch_size", "seq_len", "dim", "layers", "threads"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    heads = args.heads or (4 if args.dim % 4 == 0 else 1)
    return TrainConfig(
        schedule=schedule_from_args(args),
        steps=args.steps,
        batch_size=args.batch_size,
        model=GPTConfig(seq_len=args.seq_len, dim=args.dim, heads=heads, layers=args.layers),
        lr=args.lr,
        partition=args.partition,
        check_finite=args.check_finite,
        timeout=args.timeout,
        seed=args.seed,
        progress=not args.json,
        mesh=mesh,
        model_spec=args.model,
        model_config=args.model_config,
        split_names=tuple(n.strip() for n in args.split.split(",")) if args.split else (),
        recompute=args.recompute,
        checkpoint_dir=args.checkpoint_dir,
        save_every=args.save_every,
        resume=args.resume,
        keep=args.keep,
        device=args.device,
    )


def _train_local(config: Any, args: argparse.Namespace) -> Any:
    from stagewise.runtime.demo import train_rank
    from stagewise.runtime.launch import launch

    if config.device == "cuda":
        _check_gpus(config.world_size, "local processes")
    limit = args.timeout + 30.0 + config.steps * 10.0
    results = launch(
        train_rank, config.world_size, (config,), timeout=limit,
        grace=min(args.timeout, 10.0), threads=args.threads, backend=config.backend,
    )
    return results[0]


def _train_torchrun(config: Any, args: argparse.Namespace) -> Any:
    import torch
    import torch.distributed as dist

    from stagewise.runtime.demo import train_rank
    from stagewise.runtime.launch import torchrun_context

    torch.set_num_threads(args.threads)
    if config.device == "cuda":
        _check_gpus(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), "processes per node")
    context = torchrun_context(config.backend, timeout=args.timeout)
    try:
        report = train_rank(context, config)
    except RuntimeFailure as err:
        # Leave at once, as the local launcher's ranks do: a receive thread may still wait
        # on a rank that is gone, and tearing the process group down under it can abort.
        print(f"stagewise: training failed: {err}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    dist.destroy_process_group()
    return report


def _check_gpus(ranks: int, what: str) -> None:
    """NCCL cannot put two ranks on one GPU: refuse more ranks than GPUs on this machine."""
    import torch

    gpus = torch.cuda.device_count()
    if ranks > gpus:
        raise ConfigError(
            f"--device cuda runs one rank per GPU but {ranks} {what} need {ranks} GPUs and "
            f"this machine has {gpus}: use a smaller mesh, or --device cpu"
        )


def _print_header(config: Any) -> None:
    s, model = config.schedule, config.model
    what = (
        f"a tiny GPT ({model.layers} blocks, width {model.dim}, vocab {model.vocab})"
        if config.model_spec == "tiny" else f"{config.model_spec} ({config.num_layers()} layers)"
    )
    print(
        f"training {what}{' with recomputation' if config.recompute else ''} "
        f"with {s.name}: {s.num_ranks} ranks, {s.num_stages} stages, "
        f"{s.num_microbatches} micro-batches, {config.batch_size} x {model.seq_len} tokens "
        f"per step, {config.steps} steps"
        + ("" if config.mesh is None else
           f", mesh {config.mesh_text().replace(',', ' x ')} "
           f"({config.world_size} processes, "
           f"{config.batch_size // config.mesh.dp} sequences per replica)")
        + (", one GPU per rank" if config.device == "cuda" else ""),
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
    for path in written:
        print(f"wrote {path}")


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
