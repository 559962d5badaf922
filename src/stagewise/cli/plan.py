"""``stagewise plan``: which TP x PP x DP split fits, how fast it runs, and how to launch it.

Searches every valid configuration (or evaluates the one the knobs fix), prints the
recommendation with its memory and step-time breakdown, the ranked top plans, the best plan
of every TP x PP layout side by side, and, when nothing fits, what would. ``--json`` prints one
object with a ``plans`` list; ``--megatron``/``--torchtitan`` add launch arguments; ``--plot``
draws step time against memory for every candidate; ``--emit-config run.toml`` writes the
recommended plan as a run configuration for ``stagewise train --config run.toml`` (``--toy``:
the same layout with a tiny model of the same family, to rehearse it on one machine).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from stagewise.cli._deprecated import add_deprecated
from stagewise.errors import ConfigError, PlanError
from stagewise.plan import (
    DEFAULT_CONSTANTS,
    Cluster,
    ModelSpec,
    TrainingSpec,
    get_gpu,
    get_model,
)
from stagewise.plan.advice import check_claim, what_would_fit
from stagewise.plan.constants import TP_OVERLAPS
from stagewise.plan.emit import TOY_SEQ, run_config
from stagewise.plan.export import export_notes, megatron_command, torchtitan_toml
from stagewise.plan.models import POSITIONS, model_from_hf_config
from stagewise.plan.report import (
    AT_RISK_GIB,
    best_per_layout,
    describe_plan,
    plan_to_dict,
    table,
)
from stagewise.plan.search import SearchResult, search
from stagewise.plan.spec import DP_SHARDING, ENGINES, LAYER_SPLITS, PRECISIONS, RECOMPUTE_MODES

__all__ = ["add_parser", "run"]

PROGRESS_FROM = 2000  # candidates; smaller searches finish too fast to need a progress line


def add_parser(verbs: Any) -> None:
    parser = verbs.add_parser(
        "plan",
        help="3D-parallelism planner: memory, step time and launch arguments",
        description=(
            "Search TP x PP x DP (virtual stages, micro-batch size, recomputation, sequence "
            "parallelism, distributed optimizer, schedule, layer split) for a model on a "
            "cluster; fix any knob to evaluate one configuration."
        ),
    )
    _add_model_flags(parser)
    where = parser.add_argument_group("cluster")
    where.add_argument("--gpu", required=True, help="catalog GPU, e.g. H100 or A100-80GB")
    where.add_argument("--nodes", type=int, help="nodes")
    where.add_argument("--gpus-per-node", type=int, help="GPUs per node (default the GPU's)")
    where.add_argument("--gpus", type=int, help="total GPUs (instead of --nodes)")
    where.add_argument("--node-network-gbps", type=float, metavar="GBPS",
                       help="inter-node bandwidth per node, Gbit/s each way, all its NICs "
                            "together (e.g. 400 for 4 x 100 Gb/s; default the GPU's reference "
                            "node: one 200 Gb/s NIC per A100, 400 per H100)")
    how = parser.add_argument_group("training")
    how.add_argument("--seq-len", type=int, help="tokens per sequence (required)")
    add_deprecated(how, "--seq", "--seq-len", type=int)
    how.add_argument("--global-batch", type=int, required=True, help="sequences per step")
    how.add_argument("--lora", type=int, metavar="RANK",
                     help="LoRA fine-tuning with adapters of this rank (frozen base weights)")
    how.add_argument("--attention", choices=("flash", "unfused"), default="flash")
    how.add_argument("--precision", choices=PRECISIONS, default="bf16",
                     help="bf16, or fp8 block GEMMs (H100, H200, B200)")
    how.add_argument("--tp-overlap", choices=TP_OVERLAPS,
                     help="which TP collectives hide behind GEMMs: backward (Megatron-LM since "
                          "late 2021; the default), all (Transformer Engine userbuffers, NeMo), "
                          "none (synchronous: Megatron-LM of early 2021, Megatron-DeepSpeed, "
                          "PyTorch's DTensor TP; the default with --engine deepspeed or "
                          "pytorch)")
    how.add_argument("--engine", choices=ENGINES, default="megatron",
                     help="whose runtime runs the step: megatron (Megatron-LM, NeMo), "
                          "deepspeed (DeepSpeed's pipeline engine, Megatron-DeepSpeed: 1F1B "
                          "only, blocking transfers, bf16 optimizer) or pytorch (FSDP/DDP "
                          "stacks: torchtitan, Composer, Hugging Face, stagewise train; "
                          "PyTorch's own cross-entropy)")
    how.add_argument("--no-dp-overlap", action="store_true",
                     help="the DP gradient reduction does not overlap the backward")
    knobs = parser.add_argument_group("fixed knobs (each one narrows the search)")
    for flag in ("tp", "pp", "dp", "micro-batch-size"):
        knobs.add_argument(f"--{flag}", type=int)
    knobs.add_argument("--num-chunks", type=int, help="chunks (virtual stages) per pipeline rank")
    add_deprecated(knobs, "--vp", "--num-chunks", type=int)
    knobs.add_argument("--recompute", choices=RECOMPUTE_MODES)
    knobs.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction)
    knobs.add_argument("--dp-sharding", choices=DP_SHARDING,
                       help="what the data-parallel replicas shard: none, optimizer (ZeRO-1), "
                       "gradients (ZeRO-2) or weights (FSDP); default: none and optimizer "
                       "searched (optimizer only with --engine deepspeed)")
    knobs.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction,
                       help="Megatron-LM's name: --dp-sharding optimizer (no-: none)")
    knobs.add_argument("--schedule", help="a stagewise schedule name")
    knobs.add_argument("--layer-split", choices=LAYER_SPLITS,
                       help="how the layers split over the pipeline stages: balanced, or edges "
                       "(the embedding and the loss count as one layer each of the first and "
                       "last stage, Megatron-LM's --account-for-embedding/loss-in-pipeline-"
                       "split); default: both searched for pipelines of one chunk per "
                       "rank, balanced with virtual stages")
    out = parser.add_argument_group("output")
    out.add_argument("--top", type=int, default=10, help="plans to list (default 10)")
    out.add_argument("--layouts", metavar="TPxPP,...",
                     help="side-by-side layouts to show, e.g. 8x1,2x4,4x2 (default: all)")
    out.add_argument("--json", action="store_true", help="print one JSON object")
    out.add_argument("--megatron", action="store_true", help="Megatron-LM launch line")
    out.add_argument("--torchtitan", action="store_true", help="torchtitan TOML config")
    out.add_argument("--plot", metavar="OUT.png", help="step time vs memory of every candidate")
    out.add_argument("--tokens", type=float, help="token budget, e.g. 1e9: time and cost")
    out.add_argument("--price-per-gpu-hour", type=float,
                     help="price for the cost estimate (with --tokens)")
    out.add_argument("--memory-margin-gib", type=float, default=AT_RISK_GIB,
                     help=f"mark a fitting plan with less free memory than this at its peak "
                     f"as at risk (default {AT_RISK_GIB:g})")
    out.add_argument("--claim-steps-per-s", type=float,
                     help="check a claimed speed against the physical lower bound")
    emit = parser.add_argument_group("run configuration")
    emit.add_argument("--emit-config", metavar="RUN.toml",
                     help="write the recommended plan for stagewise train --config RUN.toml")
    emit.add_argument("--toy", action="store_true",
                     help=f"with --emit-config: keep the plan's mesh, schedule and batch but "
                     f"train a tiny model of the same family on sequences of at most "
                     f"{TOY_SEQ} tokens (rehearse the layout on one machine)")
    emit.add_argument("--steps", type=int, default=30,
                     help="with --emit-config: training steps (default 30)")
    emit.add_argument("--lr", type=float, default=3e-3,
                     help="with --emit-config: AdamW learning rate (default 3e-3)")
    parser.set_defaults(run=run)


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The model group: a catalog name, a Hugging Face config, or the shape from flags."""
    what = parser.add_argument_group("model")
    which = what.add_mutually_exclusive_group()
    which.add_argument("--model", help="catalog model, e.g. llama-2-70b")
    which.add_argument("--model-config", metavar="CONFIG.json",
                       help="a Hugging Face config.json of a dense decoder (llama, mistral, "
                            "qwen2, qwen3, phi3, gemma, gpt2, bloom, gpt_neox, mpt, opt, ...; "
                            "an unsupported type's error lists them all)")
    for flag in ("layers", "hidden", "heads", "kv-heads", "ffn", "vocab"):
        what.add_argument(f"--{flag}", type=int, help=f"model from flags: {flag}")
    what.add_argument("--head-dim", type=int,
                      help="model from flags: width of one attention head when it is not "
                           "hidden / heads")
    what.add_argument("--mlp", choices=("swiglu", "gelu"), default="swiglu",
                      help="model from flags: MLP kind")
    what.add_argument("--tied-embeddings", action="store_true", help="model from flags")
    what.add_argument("--position", choices=POSITIONS,
                      help="model from flags: position encoding (default rope for swiglu, "
                           "learned for gelu)")
    what.add_argument("--bias", action="store_true",
                      help="model from flags: linear layers carry biases (GPT-2, BLOOM)")
    what.add_argument("--dropout", action="store_true",
                      help="train with dropout (masks kept for backward), whatever the model's "
                           "own setting (a Hugging Face config often says 0)")


SHAPE_FLAGS = ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab", "position")


def _model(args: argparse.Namespace) -> ModelSpec:
    if args.model or args.model_config:
        given = [f"--{n.replace('_', '-')}" for n in SHAPE_FLAGS if getattr(args, n) is not None]
        given += [f"--{n.replace('_', '-')}" for n in ("tied_embeddings", "bias")
                  if getattr(args, n)]
        if given:
            source = "--model" if args.model else "--model-config"
            raise PlanError(
                f"{', '.join(given)} {'describe' if len(given) > 1 else 'describes'} a model "
                f"from flags, but {source} already gives the model: drop "
                f"{'them' if len(given) > 1 else 'it'}, or drop {source}"
            )
    if args.model:
        return get_model(args.model)
    if args.model_config:
        return model_from_hf_config(args.model_config)
    needed = ("layers", "hidden", "heads", "ffn", "vocab")
    missing = [f"--{n}" for n in needed if getattr(args, n) is None]
    if missing:
        raise PlanError(
            f"no model: give --model NAME, --model-config config.json, or all of "
            f"{', '.join('--' + n for n in needed)} (missing {', '.join(missing)})"
        )
    return ModelSpec(
        name="custom", layers=args.layers, hidden=args.hidden, heads=args.heads,
        kv_heads=args.kv_heads or args.heads, ffn=args.ffn, vocab=args.vocab, mlp=args.mlp,
        norm="rmsnorm" if args.mlp == "swiglu" else "layernorm",
        tied_embeddings=args.tied_embeddings,
        position=args.position or ("rope" if args.mlp == "swiglu" else "learned"),
        bias=args.bias, dropout=args.dropout, max_seq_len=args.seq_len,
        kv_channels=args.head_dim,
    )


def _cluster(args: argparse.Namespace) -> Cluster:
    gpu = get_gpu(args.gpu)
    if args.gpus is not None:
        if args.nodes is not None:
            raise PlanError("give --gpus or --nodes, not both")
        if args.gpus < 1:
            raise PlanError(f"--gpus must be >= 1, got {args.gpus}")
        cluster = Cluster.of_gpus(gpu, args.gpus, args.gpus_per_node)
    elif args.nodes is None:
        raise PlanError("give --nodes N (with --gpus-per-node K) or --gpus N")
    else:
        cluster = Cluster(gpu, args.nodes, args.gpus_per_node or gpu.gpus_per_node)
    if args.node_network_gbps is not None:
        if not 0 < args.node_network_gbps < math.inf:
            raise PlanError(
                f"--node-network-gbps must be > 0, got {args.node_network_gbps:g}: give the "
                "sum of a node's NICs in Gbit/s, e.g. 400 for 4 x 100 Gb/s"
            )
        cluster = cluster.with_node_network(args.node_network_gbps)
    return cluster


def _fixed(args: argparse.Namespace) -> dict[str, Any]:
    names = ("tp", "pp", "dp", "num_chunks", "micro_batch_size", "recompute",
             "sequence_parallel", "dp_sharding", "schedule", "layer_split")
    fixed = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.distributed_optimizer is not None:
        sharding = "optimizer" if args.distributed_optimizer else "none"
        if fixed.setdefault("dp_sharding", sharding) != sharding:
            raise PlanError(
                f"--distributed-optimizer asks for dp sharding {sharding!r} but --dp-sharding "
                f"says {fixed['dp_sharding']!r}: give one of them"
            )
    return fixed


def _progress(done: int, total: int) -> None:
    """One line rewritten in place on a terminal; a line per quarter otherwise."""
    if sys.stderr.isatty():
        end = "\n" if done == total else ""
        print(f"\rsearching: {done}/{total} configurations", end=end, file=sys.stderr,
              flush=True)
    elif done == total or (4 * done) // total != (4 * (done - 1)) // total:
        print(f"searching: {done}/{total} configurations", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Plan (see the module docstring); 0 on success, PlanError on bad input."""
    if args.seq_len is None:
        raise PlanError("give the sequence length: --seq-len N (tokens per sequence)")
    _check_budget(args)
    if args.toy and not args.emit_config:
        raise PlanError("--toy shrinks the model of the emitted run configuration: add "
                        "--emit-config RUN.toml")
    model, cluster = _model(args), _cluster(args)
    if args.lora is not None and args.lora < 1:
        raise PlanError(f"--lora takes the adapter rank, a positive integer, got {args.lora}")
    training = TrainingSpec(
        seq_len=args.seq_len, global_batch=args.global_batch,
        mode="full" if args.lora is None else "lora", lora_rank=args.lora or 16,
        attention=args.attention, dp_overlap=not args.no_dp_overlap, precision=args.precision,
        engine=args.engine, dropout=True if args.dropout else None,
    )
    fixed = _fixed(args)
    args.tp_overlap = args.tp_overlap or ("backward" if args.engine == "megatron" else "none")
    constants = replace(DEFAULT_CONSTANTS, tp_overlap=args.tp_overlap)
    result = search(model, cluster, training, fixed, constants,
                    progress=_progress_for(args, model, cluster, training),
                    exact_top=max(1, args.top))
    if not result.plans:
        reason = result.skipped[0][1] if result.skipped else "no candidate"
        raise PlanError(reason)
    best = result.best
    suggestions = (what_would_fit(model, cluster, training, constants)
                   if best is None and not fixed else [])
    claim = None
    if args.claim_steps_per_s is not None:
        claim = check_claim(model, cluster, training, args.claim_steps_per_s, best)
    if args.plot:
        from stagewise.plan.plot import plot_plans

        plot_plans(result.plans, args.plot, best)
    shown = result.plans[: max(1, args.top)]
    emitted = _emit(args, best) if args.emit_config else None
    if args.json:
        _print_json(args, model, cluster, training, result, shown, suggestions, claim, emitted)
    else:
        _print_text(args, model, cluster, training, result, shown, suggestions, claim)
        if emitted is not None:
            _print_emitted(args, emitted, cluster)
    return 0


def _check_budget(args: argparse.Namespace) -> None:
    """Refuse token budgets, prices and margins that mean nothing."""
    for flag, value in (("--tokens", args.tokens), ("--price-per-gpu-hour",
                                                    args.price_per_gpu_hour)):
        if value is not None and not value > 0:
            raise PlanError(f"{flag} must be > 0, got {value:g}")
    if args.price_per_gpu_hour is not None and args.tokens is None:
        raise PlanError(
            "--price-per-gpu-hour prices a run, whose length comes from --tokens: add "
            "--tokens N (the token budget, e.g. 1e12)"
        )
    if args.memory_margin_gib < 0:
        raise PlanError(f"--memory-margin-gib must be >= 0, got {args.memory_margin_gib:g}")


def _emit(args: argparse.Namespace, best: Any) -> Any:
    """Write the recommended plan as a run configuration; return the RunConfig."""
    if best is None:
        raise PlanError(
            f"nothing fits, so --emit-config wrote no {args.emit_config}: run the plan without "
            "it to see what would fit, then plan that"
        )
    original = None
    if args.model_config:  # already read once by _model, so it is a JSON object
        original = json.loads(Path(args.model_config).read_text())
    config = run_config(best, steps=args.steps, lr=args.lr, toy=args.toy, hf_config=original)
    try:
        Path(args.emit_config).write_text(config.to_toml(), encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot write run configuration {args.emit_config!r}: {err}") from None
    return config


def _print_emitted(args: argparse.Namespace, config: Any, cluster: Cluster) -> None:
    path, world = args.emit_config, config.world_size
    what = "toy run" if args.toy else "run"
    print(f"\nwrote {path}: {what} of {config.source.configuration}, {world} processes")
    print(f"  stagewise train --config {path}")
    if not args.toy and cluster.nodes > 1:
        print(f"  torchrun --nnodes {cluster.nodes} --nproc-per-node {cluster.gpus_per_node} "
              f"... -m stagewise train --config {path}")


def _progress_for(
    args: argparse.Namespace, model: ModelSpec, cluster: Cluster, training: TrainingSpec
) -> Any:
    from stagewise.plan.search import candidates

    count = sum(1 for _ in candidates(model, cluster, training, _fixed(args)))
    return _progress if count >= PROGRESS_FROM else None


def _layouts(args: argparse.Namespace, result: SearchResult) -> list[tuple[int, int, Any]]:
    """Best plan per (TP, PP), restricted to ``--layouts`` when given (in that order)."""
    layouts = best_per_layout(result.plans)
    if not args.layouts:
        return layouts
    by_key = {(tp, pp): (tp, pp, plan) for tp, pp, plan in layouts}
    chosen = []
    for item in args.layouts.split(","):
        try:
            tp, pp = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise PlanError(f"--layouts takes TPxPP pairs like 8x1,2x4, got {item!r}") from None
        if (tp, pp) not in by_key:
            raise PlanError(f"layout TP={tp} PP={pp} has no valid configuration here")
        chosen.append(by_key[(tp, pp)])
    return chosen


_ENGINE_NAMES = {"megatron": "Megatron-LM's runtime", "deepspeed": "DeepSpeed's pipeline engine",
                 "pytorch": "a PyTorch-native runtime"}


def _dp_words(training: TrainingSpec) -> str:
    """How the header says the DP gradient reduction is timed, and the flag that changes it."""
    if training.engine == "deepspeed":
        return "DP reduction after the last backward (the engine's)"
    if training.dp_overlap:
        return "DP reduction overlapped with the backward (--no-dp-overlap: after it)"
    return "DP reduction after the last backward"


def _print_text(
    args: argparse.Namespace, model: ModelSpec, cluster: Cluster, training: TrainingSpec,
    result: SearchResult, shown: list[Any], suggestions: list[Any], claim: Any,
) -> None:
    gpu = cluster.gpu
    recipe = f"LoRA rank {training.lora_rank}" if training.mode == "lora" else "full training"
    print(
        f"{model.name} ({model.num_params / 1e9:.1f}B parameters), {recipe}, "
        f"{training.precision} + Adam, on {cluster.nodes} x {cluster.gpus_per_node} {gpu.name} "
        f"({gpu.memory_gib:g} GiB, "
        f"{gpu.peak_flops / 1e12:g} TFLOP/s BF16, {cluster.node_network_gbps:g} Gb/s per node "
        f"between nodes); seq_len {training.seq_len}, global batch "
        f"{training.global_batch}; timed for {_ENGINE_NAMES[training.engine]}, TP overlap "
        f"{args.tp_overlap}, {_dp_words(training)}, {training.attention} attention"
    )
    fitting = len(result.fitting)
    print(
        f"evaluated {len(result.plans)} configurations in {result.seconds:.1f} s "
        f"({result.simulations} pipeline simulations): {fitting} fit, "
        f"{len(result.plans) - fitting} do not, {len(result.skipped)} could not be built"
    )
    best = result.best
    tokens, price = args.tokens, args.price_per_gpu_hour
    if best is not None:
        print("\nrecommended:")
        print(describe_plan(best, tokens, price, args.memory_margin_gib))
    else:
        print(f"\nnothing fits in {cluster.num_gpus} x {gpu.memory_gib:g} GiB. Closest:")
        print(describe_plan(result.plans[0], tokens, price, args.memory_margin_gib))
        if suggestions:
            print("\nwhat would fit:")
            for s in suggestions:
                print(f"- {s.change}:")
                print(describe_plan(s.plan, tokens, price, args.memory_margin_gib))
    print(f"\ntop {len(shown)}:")
    print(table(shown, margin_gib=args.memory_margin_gib))
    layouts = _layouts(args, result)
    if len(layouts) > 1:
        print("\nbest plan of each TP x PP layout, side by side:")
        print(table([plan for _, _, plan in layouts], margin_gib=args.memory_margin_gib))
    if claim is not None:
        print("\n" + claim.describe(cluster))
    chosen = best or result.plans[0]
    if args.megatron or args.torchtitan:
        for note in export_notes(chosen):
            print(f"# note: {note}")
    if args.megatron:
        print("\n# Megatron-LM")
        print(megatron_command(chosen))
    if args.torchtitan:
        print("\n# torchtitan")
        print(torchtitan_toml(chosen), end="")
    if args.plot:
        print(f"\nwrote {args.plot}")


def _print_json(
    args: argparse.Namespace, model: ModelSpec, cluster: Cluster, training: TrainingSpec,
    result: SearchResult, shown: list[Any], suggestions: list[Any], claim: Any,
    emitted: Any = None,
) -> None:
    tokens, price = args.tokens, args.price_per_gpu_hour

    def plan_dict(plan: Any, exports: bool = False) -> dict[str, Any]:
        return plan_to_dict(plan, tokens, price, exports and args.megatron,
                            exports and args.torchtitan, args.memory_margin_gib)

    best = result.best
    document: dict[str, Any] = {
        "model": model.name,
        "num_params": model.num_params,
        "gpu": cluster.gpu.name,
        "nodes": cluster.nodes,
        "gpus_per_node": cluster.gpus_per_node,
        "node_network_gbps": cluster.node_network_gbps,
        "engine": training.engine,
        "tp_overlap": args.tp_overlap,
        "seq_len": training.seq_len,
        "global_batch": training.global_batch,
        "mode": training.mode,
        "evaluated": len(result.plans),
        "fitting": len(result.fitting),
        "skipped": len(result.skipped),
        "search_seconds": result.seconds,
        "plans": [plan_dict(p, exports=i == 0) for i, p in enumerate(shown)],
        "best_per_layout": [plan_dict(p) for _, _, p in _layouts(args, result)],
        "recommended": None if best is None else plan_dict(best, exports=True),
        "what_would_fit": [
            {"change": s.change, "plan": plan_dict(s.plan)} for s in suggestions
        ],
    }
    if claim is not None:
        document["claim"] = claim.to_dict()
    if args.plot:
        document["plot"] = args.plot
    if emitted is not None:
        document["run_config"] = {
            "path": args.emit_config, "toy": args.toy, "world_size": emitted.world_size,
            "train_args": emitted.train_args(),
        }
    print(json.dumps(document, indent=1))
