"""A run ready to launch: the :class:`RunConfig`, its schedule, and the checks that need torch.

:func:`prepare` does, before any rank starts, every check that would otherwise fail inside the
ranks (device, model folder and its weights, model build, stages against layers,
tensor-parallel plan, FSDP, checkpoint folder, the data and its tokenizer), so a bad run is one
clear error instead of one per rank. It also tokenises the data once (filling the cache the
ranks then read).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stagewise.errors import ConfigError
from stagewise.runconfig import RunConfig
from stagewise.runtime.checkpoint.folders import (
    checkpoint_step,
    complete_checkpoints,
    resume_checkpoint,
)
from stagewise.runtime.engine.partition import balance
from stagewise.runtime.models.model_parts import ModelParts, tiny_gpt_parts
from stagewise.runtime.models.tiny_gpt import GPTConfig
from stagewise.runtime.parallel.mesh import check_shard_replicas
from stagewise.runtime.parallel.tensor_parallel import check_tensor_parallel
from stagewise.schedules.ir import Schedule

__all__ = ["Job", "model_parts", "prepare"]


@dataclass(frozen=True)
class Job:
    """What every rank receives.

    Attributes:
        config: the run.
        schedule: the validated schedule every pipeline runs.
        num_layers: layers the partitioner cuts between (embedding and head included).
        progress: show a progress bar and a line per step (on one last-stage rank).
        temporary_checkpoints: the checkpoint folder was made for ``--export-hf`` alone and
            is removed after the export.
    """

    config: RunConfig
    schedule: Schedule
    num_layers: int
    progress: bool = True
    temporary_checkpoints: bool = False

    @property
    def world_size(self) -> int:
        """Processes the run needs: pp x dp x tp."""
        return self.config.world_size

    @property
    def rank_names(self) -> list[str]:
        """How messages name each global rank: ``rank 3 (pp 1, dp 1)`` in a mesh."""
        from stagewise.runtime.engine.heartbeat import rank_names

        mesh = self.config.mesh
        return rank_names(mesh.pp, mesh.dp, mesh.tp)

    @property
    def rows_per_replica(self) -> int:
        """Sequences each data-parallel replica trains on per step."""
        return self.config.batch.global_batch // self.config.mesh.dp


def prepare(config: RunConfig, *, progress: bool = True) -> Job:
    """Build the schedule and check the run before launch.

    Raises:
        ConfigError: no CUDA GPU for ``device = "cuda"``, a model that cannot be built, more
            stages than layers, blocks the tensor-parallel plan cannot shard over tp, FSDP with
            a split-backward schedule or ties, or checkpoint settings that would fail.
    """
    _check_device(config.launch.device)
    if config.model.is_folder:
        from stagewise.runtime.models.hf_folder import check_model_folder

        check_model_folder(config.model.spec)
    schedule = config.schedule.build(config.mesh.pp)
    # The model is built once here, without weights (a Hugging Face model's parameters stay
    # on the meta device): enough for its layer count, shapes and ties.
    parts = model_parts(config, empty=True)
    balance([1.0] * len(parts.layers), schedule.num_stages)
    tp = config.mesh.tp
    if tp > 1 and check_tensor_parallel(nn.Sequential(*parts.layers), tp, parts.tp_plan) == 0:
        raise ConfigError(
            f"tp={tp} but model {config.model.spec!r} has no block stagewise can shard "
            "(attention with q/k/v/o projections and a two- or three-matrix MLP): it would "
            "run whole on every tp rank; use tp=1"
        )
    if config.mesh.dp_shard:
        check_shard_replicas(schedule, parts.ties)
    _check_checkpoints(config)
    _check_writable(config, parts)
    _check_extras(config, parts)
    if config.data.any:
        _check_data(config, parts, progress)
    temporary = config.checkpoint.export_hf is not None and config.checkpoint.dir is None
    if temporary:
        folder = tempfile.mkdtemp(prefix="stagewise-export-")
        config = config.override({"checkpoint": {"dir": folder}})
    return Job(config, schedule, len(parts.layers), progress, temporary)


def _check_extras(config: RunConfig, parts: ModelParts) -> None:
    """LoRA targets against the model's modules; tensorboard installed when asked for."""
    if config.training.lora is not None:
        from stagewise.runtime.models.lora import LoraSpec, check_lora_targets

        check_lora_targets(parts, LoraSpec.parse(config.training.lora))
    if config.metrics.tensorboard is not None:
        from stagewise.train.metrics import require_tensorboard

        require_tensorboard()


def _check_data(config: RunConfig, parts: ModelParts, progress: bool) -> None:
    """Tokenise the data (cached for the ranks) and check it fits the model's embedding."""
    from stagewise.train.batches import load_data

    loaded = load_data(config, progress=progress)
    vocab = _vocab_size(parts)
    if vocab is not None and loaded.tokenizer_size > vocab:
        raise ConfigError(
            f"the tokenizer has {loaded.tokenizer_size} tokens but the model's embedding has "
            f"{vocab} rows: use the model's own tokenizer, or resize the embedding first"
        )


def _vocab_size(parts: ModelParts) -> int | None:
    """Rows of the first layer's embedding (None when it has none)."""
    for module in parts.layers[0].modules():
        if isinstance(module, nn.Embedding):
            return int(module.num_embeddings)
    return None


def model_parts(config: RunConfig, empty: bool = False) -> ModelParts:
    """Build the model (the same weights on every call: they come from the seed).

    ``empty``: a Hugging Face model's parameters stay on the meta device (no memory) until
    ``parts.materialize`` fills those a rank keeps; other models are built whole.
    """
    model, seed, seq_len = config.model, config.training.seed, config.batch.seq_len
    if model.spec == "tiny":
        assert model.dim is not None
        assert model.heads is not None
        assert model.layers is not None
        tiny = GPTConfig(seq_len=seq_len, dim=model.dim, heads=model.heads, layers=model.layers)
        return tiny_gpt_parts(tiny, seed=seed)
    from stagewise.runtime.models.resolve import resolve_model

    return resolve_model(
        model.spec, config=model.config_file or model.hf_config or None, seed=seed,
        seq_len=seq_len, names=model.split or None, empty=empty,
    )


def _check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda but this machine has no CUDA GPU that torch can use (or the "
            "installed torch is a CPU build): use --device cpu"
        )


def _check_checkpoints(config: RunConfig) -> None:
    """Checkpoint settings that would fail inside the ranks: refuse them before launch."""
    checkpoint, steps = config.checkpoint, config.training.steps
    if checkpoint.dir is None:
        return
    if checkpoint.resume:
        path = resume_checkpoint(checkpoint.dir, checkpoint.resume_from)  # every file checked
        step = checkpoint_step(path)
        _note_skipped(Path(checkpoint.dir), step)
        if steps - step < 2:
            raise ConfigError(
                f"the checkpoint {str(path)!r} is at step {step} of {steps}: fewer than 2 "
                f"steps are left (the first is warm-up); raise --steps above {step + 1}"
            )
    elif checkpoint.save_every:
        later = [p for n, p in complete_checkpoints(Path(checkpoint.dir))
                 if n > checkpoint.save_every]
        if later:
            raise ConfigError(
                f"{checkpoint.dir!r} already holds {later[-1].name}, a later step than this "
                f"run's first save (step {checkpoint.save_every}): pass --resume to continue "
                "it, or use an empty --checkpoint-dir"
            )


def _note_skipped(root: Path, step: int) -> None:
    """Say so when the resume leaves newer folders behind (a save cut short, or an older step
    asked for with --resume-from): never a silent step back."""
    if not root.is_dir():
        return
    newer = sorted(p.name for p in root.iterdir() if p.name.startswith("step-")
                   and p.name[5:13].isdigit() and int(p.name[5:13]) > step)
    if newer:
        print(f"stagewise: resuming from step {step}; newer {', '.join(newer)} left as is "
              "(its save was cut short, or --resume-from asked for an older step)",
              file=sys.stderr, flush=True)


def _check_writable(config: RunConfig, parts: ModelParts) -> None:
    """A run that will save: the folder can be written and has room for a checkpoint
    (weights and AdamW's two moments in fp32, 12 bytes a parameter, plus 10 %)."""
    checkpoint = config.checkpoint
    if checkpoint.dir is None or not (checkpoint.save_every or checkpoint.export_hf):
        return
    root = Path(checkpoint.dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".probe-"):
            pass
    except OSError as err:
        raise ConfigError(f"cannot write checkpoints to {str(root)!r} ({err.strerror}): pick a "
                          "writable --checkpoint-dir") from None
    if config.training.lora is not None:
        return  # adapters only: a small fraction of the model
    numel = sum(p.numel() for layer in parts.layers for p in layer.parameters())
    need = int(numel * 12 * 1.1)
    free = shutil.disk_usage(root).free
    if free < need:
        raise ConfigError(
            f"a checkpoint of this model takes about {need / 2**20:,.0f} MiB but "
            f"{str(root)!r} has {free / 2**20:,.0f} MiB free: free space or pick another "
            "--checkpoint-dir")
