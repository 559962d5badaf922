"""The sections of a run configuration (besides ``[mesh]`` and ``[model]``), each a frozen
dataclass checked on construction. Pure Python."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from stagewise.errors import ConfigError, ScheduleError
from stagewise.runconfig._toml import _check_type, _positive
from stagewise.schedules import Schedule, build, check, get, names

__all__ = [
    "DEVICES",
    "PARTITIONS",
    "RECOMPUTE",
    "BatchConfig",
    "CheckpointConfig",
    "DataConfig",
    "LaunchConfig",
    "MetricsConfig",
    "ScheduleConfig",
    "SourceInfo",
    "TrainingConfig",
]

RECOMPUTE = ("none", "full")
DTYPES = ("fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine", "linear")
PARTITIONS = ("even", "params", "time")
DEVICES = ("cpu", "cuda")
UNBUILT = ("auto",)  # schedules not built to check a config: auto searches (seconds)


@dataclass(frozen=True)
class ScheduleConfig:
    """The pipeline schedule.

    Attributes:
        name: a registered schedule (``stagewise compare`` lists them).
        num_chunks: v, chunks (virtual stages) per pipeline rank; None for the schedule's
            default (some schedules fix it: 1 for 1f1b, 2 for zb-v and dualpipev).
        num_microbatches: m, micro-batches per replica and step.
        file: a schedule CSV (one row of actions such as ``2F0`` per rank) to run instead of
            a registered one; it brings its own name, ranks, chunks and micro-batches.
    """

    name: str = "1f1b"
    num_chunks: int | None = None
    num_microbatches: int = 8
    file: str | None = None
    _loaded: Schedule | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.file is not None:
            self._load_file()
            return
        if not isinstance(self.name, str):
            raise ConfigError(f"[schedule] name must be a string, got {self.name!r}")
        try:
            generator = get(self.name)
        except ScheduleError:
            raise ConfigError(
                f"[schedule] name = {self.name!r} is not a schedule: choose one of "
                f"{', '.join(names())}"
            ) from None
        if self.num_chunks is None:
            object.__setattr__(self, "num_chunks", generator.default_chunks)
        _positive("schedule", "num_chunks", self.num_chunks)
        _positive("schedule", "num_microbatches", self.num_microbatches)
        if generator.fixed_chunks is not None and self.num_chunks != generator.fixed_chunks:
            raise ConfigError(
                f"[schedule] num_chunks = {self.num_chunks} but {self.name} runs exactly "
                f"{generator.fixed_chunks} chunk(s) per rank: set num_chunks = "
                f"{generator.fixed_chunks} or use interleaved-1f1b"
            )

    def _load_file(self) -> None:
        schedule = Schedule.load_csv(Path(str(self.file)))
        check(schedule)
        object.__setattr__(self, "_loaded", schedule)
        object.__setattr__(self, "name", schedule.name)
        object.__setattr__(self, "num_chunks", schedule.num_chunks)
        object.__setattr__(self, "num_microbatches", schedule.num_microbatches)

    @property
    def takes_chunks(self) -> bool:
        """Whether the schedule accepts any v (so ``--chunks`` must be passed)."""
        return self.file is None and get(self.name).fixed_chunks is None

    @property
    def file_ranks(self) -> int | None:
        """The schedule file's ranks (None without a file)."""
        return None if self._loaded is None else self._loaded.num_ranks

    def build(self, num_ranks: int) -> Schedule:
        """The validated schedule for ``num_ranks`` pipeline ranks.

        Raises:
            ConfigError: the schedule cannot be built for these sizes, or the file has other
                ranks.
        """
        if self._loaded is not None:
            if self._loaded.num_ranks != num_ranks:
                raise ConfigError(
                    f"the schedule file {self.file} has {self._loaded.num_ranks} ranks but the "
                    f"mesh has pp={num_ranks}: use pp={self._loaded.num_ranks} or another file"
                )
            return self._loaded
        try:
            return build(self.name, num_ranks=num_ranks, num_microbatches=self.num_microbatches,
                         num_chunks=self.num_chunks)
        except ScheduleError as err:
            raise ConfigError(f"[schedule] with [mesh] pp = {num_ranks}: {err}") from None


@dataclass(frozen=True)
class BatchConfig:
    """Batch sizes.

    Attributes:
        global_batch: sequences per step over all replicas (split evenly over the ``dp``
            replicas, then into the schedule's micro-batches).
        micro_batch_size: sequences per micro-batch; when given, ``global_batch`` must equal
            ``micro_batch_size x num_microbatches x dp``; None splits each replica's share
            into nearly equal micro-batches.
        seq_len: tokens per sequence.
    """

    global_batch: int = 16
    micro_batch_size: int | None = None
    seq_len: int = 32

    def __post_init__(self) -> None:
        for name in ("global_batch", "seq_len"):
            _positive("batch", name, getattr(self, name))
        if self.micro_batch_size is not None:
            _positive("batch", "micro_batch_size", self.micro_batch_size)


@dataclass(frozen=True)
class TrainingConfig:
    """The optimisation.

    Attributes:
        steps: optimizer steps (at least 2: the first is warm-up for the timings).
        lr: AdamW learning rate.
        recompute: ``"none"`` keeps every layer's activations until its backward; ``"full"``
            keeps only each layer's input and runs the layer's forward again inside its
            backward (``torch.utils.checkpoint`` per layer).
        seed: model and data seed.
        partition: how layers are cut into stages: ``even``, ``params`` or ``time``.
        check_finite: stop every rank at the first NaN or infinite loss.
        dtype: ``"fp32"``, or ``"bf16"``: compute, activations and transfers in bf16 under
            autocast, fp32 weights (the master weights) and optimizer state.
        weight_decay: AdamW's decay, on weights of two or more dimensions (not on norms and
            biases).
        clip_grad: clip gradients to this global norm (over every pp, tp and dp rank); None
            for no clipping.
        lr_schedule: ``constant``, ``cosine`` or ``linear`` decay (to 10 % of ``lr``) after
            ``warmup_steps`` of linear warm-up.
        warmup_steps: steps of linear warm-up.
        grad_accum: pipeline steps (batches) whose gradients make one optimizer step.
        lora: LoRA adapters through peft (``r=16,alpha=32,dropout=0.05,targets=q_proj,...``);
            only they train. None: every weight trains.
    """

    steps: int = 30
    lr: float = 3e-3
    recompute: str = "none"
    seed: int = 0
    partition: str = "params"
    check_finite: bool = False
    dtype: str = "fp32"
    weight_decay: float = 0.01
    clip_grad: float | None = None
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    grad_accum: int = 1
    lora: str | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.steps, int) and not isinstance(self.steps, bool)
                and self.steps < 2):
            _positive("training", "steps", self.steps)
        if self.steps < 2:
            raise ConfigError(
                f"[training] steps = {self.steps}: stagewise train needs steps >= 2 (the first "
                "step is warm-up): set steps = 2 or more"
            )
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float):
            raise ConfigError(f"[training] lr must be a number, got {self.lr!r}: write lr = 0.003")
        if math.isnan(self.lr) or self.lr <= 0:
            raise ConfigError(f"[training] lr must be a positive number, got {self.lr!r}")
        object.__setattr__(self, "lr", float(self.lr))
        _choice("training", "recompute", self.recompute, RECOMPUTE)
        _choice("training", "partition", self.partition, PARTITIONS)
        _choice("training", "dtype", self.dtype, DTYPES)
        self._check_optimizer()

    def _check_optimizer(self) -> None:
        _choice("training", "lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_type("training", "weight_decay", self.weight_decay, float)
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.clip_grad is not None:
            _check_type("training", "clip_grad", self.clip_grad, float)
            if not self.clip_grad > 0:
                raise ConfigError(f"--clip-grad must be a norm > 0, got {self.clip_grad}: "
                                  "leave it out for no clipping")
        _check_type("training", "warmup_steps", self.warmup_steps, int)
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(
                f"--warmup-steps {self.warmup_steps} does not fit a run of {self.steps} steps: "
                f"use 0 to {self.steps - 1} warm-up steps"
            )
        _positive("training", "grad_accum", self.grad_accum)
        if self.lora is not None:
            from stagewise.lora_spec import LoraSpec

            LoraSpec.parse(self.lora)
        _check_type("training", "seed", self.seed, int)
        _check_type("training", "check_finite", self.check_finite, bool)


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints (``torch.distributed.checkpoint``, one folder per step, keyed by layer).

    Attributes:
        dir: where checkpoints are written and read; None for none.
        save_every: write a checkpoint after every this many steps (0: never).
        keep: keep only this many newest checkpoints (None: all).
        resume: continue from the newest checkpoint in ``dir`` (refused if it is damaged).
        resume_from: continue from this step's checkpoint instead (sets ``resume``).
        export_hf: at the end of the run, write the trained model as a Hugging Face folder
            here (``stagewise export``'s output; model folders only).
    """

    dir: str | None = None
    save_every: int = 0
    keep: int | None = None
    resume: bool = False
    export_hf: str | None = None
    resume_from: int | None = None

    def __post_init__(self) -> None:
        _check_type("checkpoint", "save_every", self.save_every, int)
        if self.resume_from is not None:
            if isinstance(self.resume_from, bool) or not isinstance(
                    self.resume_from, int) or self.resume_from < 0:
                raise ConfigError(f"--resume-from must be a step >= 0, got {self.resume_from!r}")
            object.__setattr__(self, "resume", True)
        if self.save_every < 0:
            raise ConfigError(f"[checkpoint] save_every must be >= 0 steps, got {self.save_every}")
        if self.keep is not None and (isinstance(self.keep, bool) or not isinstance(
                self.keep, int) or self.keep < 1):
            raise ConfigError(f"--keep must be >= 1 checkpoints, got {self.keep}")
        if (self.save_every or self.resume) and not self.dir:
            raise ConfigError("saving or resuming checkpoints needs a folder: pass "
                              "--checkpoint-dir DIR")


@dataclass(frozen=True)
class DataConfig:
    """Training and evaluation data (``stagewise.data``); none: generated data.

    Attributes:
        paths: files or folders to train on (.txt, .jsonl/.json, .parquet, .arrow).
        eval_paths: files or folders to evaluate on.
        eval_every: evaluate every this many steps (0: only at the end, when there is eval
            data).
        tokenizer: the tokenizer's folder; None for the model folder's own.
        cache_dir: where tokenised data is cached; None for ``$XDG_CACHE_HOME/stagewise``.
    """

    paths: tuple[str, ...] = ()
    eval_paths: tuple[str, ...] = ()
    eval_every: int = 0
    tokenizer: str | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("paths", "eval_paths"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, list | tuple) or not all(
                    isinstance(v, str) and v for v in value):
                raise ConfigError(f"[data] {name} must be a list of paths, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        _check_type("data", "eval_every", self.eval_every, int)
        if self.eval_every < 0:
            raise ConfigError(f"[data] eval_every must be >= 0 steps, got {self.eval_every}")
        if self.eval_every and not self.eval_paths:
            raise ConfigError("--eval-every needs evaluation data: pass --eval-data PATH")

    @property
    def any(self) -> bool:
        """Whether any data is given (training or evaluation)."""
        return bool(self.paths or self.eval_paths)


@dataclass(frozen=True)
class MetricsConfig:
    """Per-step metrics (loss, learning rate, gradient norm, tokens/s, MFU, memory).

    Attributes:
        tensorboard: a folder for TensorBoard event files; None for none.
        jsonl: a file of JSON lines, one per step; None for none.
    """

    tensorboard: str | None = None
    jsonl: str | None = None


@dataclass(frozen=True)
class LaunchConfig:
    """Where and how the ranks run.

    Attributes:
        device: ``"cpu"`` (gloo) or ``"cuda"`` (one GPU per rank, NCCL).
        timeout: seconds any wait for another rank may take.
        threads: torch threads per rank.
    """

    device: str = "cpu"
    timeout: float = 60.0
    threads: int = 1

    def __post_init__(self) -> None:
        _choice("launch", "device", self.device, DEVICES)
        _check_type("launch", "timeout", self.timeout, float)
        if not self.timeout > 0:
            raise ConfigError(f"[launch] timeout must be > 0 seconds, got {self.timeout!r}")
        object.__setattr__(self, "timeout", float(self.timeout))
        _positive("launch", "threads", self.threads)

    @property
    def backend(self) -> str:
        """The process group's backend for ``device``: gloo on CPU, NCCL on CUDA."""
        return "nccl" if self.device == "cuda" else "gloo"


@dataclass(frozen=True)
class SourceInfo:
    """What produced the file (for the reader; the trainer ignores it).

    Attributes:
        planner: the command that wrote it.
        model: the planned model's name (``llama-2-70b``).
        gpu: the planned device.
        nodes, gpus_per_node: the planned cluster.
        configuration: the plan in one line (``TP=4 PP=4 DP=2 ... zb-v``).
        predicted_step_s: the planner's step time, seconds.
        memory_per_gpu_gib: the planner's memory on the most loaded GPU, GiB.
        notes: what the run does differently from the plan.
    """

    planner: str = "stagewise plan"
    model: str = ""
    gpu: str = ""
    nodes: int = 1
    gpus_per_node: int = 1
    configuration: str = ""
    predicted_step_s: float = 0.0
    memory_per_gpu_gib: float = 0.0
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.notes, list):
            object.__setattr__(self, "notes", tuple(self.notes))
        for name, kind in SOURCE_KEYS.items():
            _check_type("source", name, getattr(self, name), kind)


SOURCE_KEYS: dict[str, type] = {
    "planner": str, "model": str, "gpu": str, "nodes": int, "gpus_per_node": int,
    "configuration": str, "predicted_step_s": float, "memory_per_gpu_gib": float, "notes": list,
}


def _choice(section: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"[{section}] {name} = {value!r}: choose one of {', '.join(repr(c) for c in choices)}"
        )
