"""Check pipeline x data x tensor parallelism against one process on the whole global batch.

:func:`check_mesh_rank` runs on every rank of a launched ``pp * dp * tp`` group: it builds the
mesh, the tiny GPT from a seed, cuts it into the schedule's stages, shards each stage's blocks
over the tp ranks, and trains a few steps: each replica runs the pipeline on its slice of the
global batch, then gradients (and the loss) are averaged over the dp group. Every rank compares
the loss and every gradient of its own stages (a sharded one gathered whole) with a deep copy of
the whole model, taken before sharding, trained in this one process on the whole global batch,
and checks that the replicated parameters' gradients are equal over the tp ranks.

:func:`check_llama_tp_rank` does the same for Hugging Face Llama decoder layers sharded over
all ranks (tp only, no pipeline): output, input gradient and every parameter gradient.
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.utils._python_dispatch import TorchDispatchMode

from stagewise.errors import ConfigError
from stagewise.runtime.engine.launch import RankContext
from stagewise.runtime.engine.partition import partition, stages_for_rank
from stagewise.runtime.engine.pipeline import Pipeline
from stagewise.runtime.engine.saved import SavedBytes
from stagewise.runtime.models.tiny_gpt import (
    Block,
    GPTConfig,
    gpt_layers,
    lm_loss,
    make_batch,
    tp_plan,
)
from stagewise.runtime.models.tp_plans import llama_plan
from stagewise.runtime.parallel.mesh import (
    Mesh,
    MeshGroups,
    OverlappedAverage,
    average_gradients,
    average_loss,
    build_mesh,
    replica_slice,
    shard_replicas,
)
from stagewise.runtime.parallel.tensor_parallel import apply_tensor_parallel
from stagewise.schedules.registry import build
from workers.pipeline import _close

__all__ = ["check_llama_tp_rank", "check_mesh_rank"]

CONFIG = GPTConfig(vocab=16, seq_len=8, dim=16, heads=2, layers=4)


def check_mesh_rank(
    context: RankContext,
    spec: Mesh,
    schedules: list[str],
    overlap: bool | Collection[str] = False,
    llama: bool = False,
    num_microbatches: int = 4,
    batch_size: int = 8,
    steps: int = 2,
    timeout: float = 60.0,
) -> dict[str, list[str]]:
    """Run each named schedule over the mesh; return the mismatches found on this rank.

    ``overlap`` averages gradients with :class:`OverlappedAverage` (during the step) instead
    of :func:`average_gradients` (after it), for every schedule (True) or for the names it
    lists; with ``spec.dp_shard`` the stages are sharded over dp by :func:`shard_replicas`
    and nothing averages afterwards. ``llama`` also shards a tiny Llama's decoder layers over
    this rank's tp group (as :func:`check_llama_tp_rank`; its mismatches under the key
    ``"llama"``), saving a launch.

    Mismatches are collected, not raised, so every rank stays in step and every case runs.
    """
    groups = build_mesh(spec)
    results: dict[str, list[str]] = {}
    for name in schedules:
        overlapped = overlap is True or (not isinstance(overlap, bool) and name in overlap)
        results[name] = _check_schedule(
            context, spec, groups, name, overlapped,
            num_microbatches=num_microbatches, batch_size=batch_size, steps=steps,
            timeout=timeout,
        )
    if llama:
        results["llama"] = _check_llama(groups.tp_mesh, f"llama rank {context.rank}")
    return results


def _check_schedule(
    context: RankContext,
    spec: Mesh,
    groups: MeshGroups,
    name: str,
    overlapped: bool,
    *,
    num_microbatches: int,
    batch_size: int,
    steps: int,
    timeout: float,
) -> list[str]:
    """Train ``steps`` steps of schedule ``name`` over the mesh beside the one-process
    reference; return this rank's mismatches."""
    schedule = build(name, num_ranks=spec.pp, num_microbatches=num_microbatches)
    layers = gpt_layers(CONFIG, seed=1)
    reference = torch.nn.Sequential(*copy.deepcopy(layers))
    stages = partition(layers, schedule.num_stages)
    mine = stages_for_rank(schedule, stages, groups.pp_rank)
    problems = _shard_tensor_parallel(spec, groups, mine, f"{name} rank {context.rank}")
    reducer = None
    if spec.dp_shard:
        shard_replicas(mine, groups, schedule)
    elif overlapped:
        reducer = OverlappedAverage(schedule, groups.pp_rank, mine, groups.dp_group)
    pipe = Pipeline(
        schedule, mine, lm_loss, group=groups.pp_group, timeout=timeout, store=context.store,
        count_saved=True, on_action=reducer.on_action if reducer is not None else None,
    )
    params = [p for module in mine.values() for p in module.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(7)
    compared = 0
    for number in range(steps):
        inputs, targets = make_batch(CONFIG, batch_size, generator)
        loss = pipe.step(
            replica_slice(inputs, spec.dp, groups.dp_rank),
            replica_slice(targets, spec.dp, groups.dp_rank),
        )
        if reducer is not None:
            reducer.finish()
        elif not spec.dp_shard:
            average_gradients(mine.values(), groups.dp_group)
        ref_loss = lm_loss(reference(inputs), targets)
        ref_loss.backward()
        label = f"{name} rank {context.rank} step {number}"
        compared += _compare_step(
            loss, ref_loss, mine, stages, reference, groups, label, problems
        )
        if number == 0 and spec.tp == 1:
            rows = batch_size // spec.dp // num_microbatches
            compared += _check_saved(pipe, inputs[:rows], stages, reference, label, problems)
        optimizer.step()
        ref_optimizer.step()
        optimizer.zero_grad()
        ref_optimizer.zero_grad()
    if compared == 0:
        problems.append(f"{name} rank {context.rank}: nothing was compared")
    return problems


def _shard_tensor_parallel(
    spec: Mesh, groups: MeshGroups, mine: dict[int, nn.Module], label: str
) -> list[str]:
    """Shard this rank's stages over its tp group; a problem unless every block was sharded
    (none when tp is 1)."""
    sharded = sum(apply_tensor_parallel(m, groups.tp_mesh, tp_plan) for m in mine.values())
    blocks = sum(isinstance(layer, Block) for m in mine.values() for layer in m.modules())
    if sharded != (blocks if spec.tp > 1 else 0):
        return [f"{label}: {sharded} of {blocks} blocks sharded"]
    return []


def _compare_step(
    loss: torch.Tensor | None,
    ref_loss: torch.Tensor,
    mine: dict[int, nn.Module],
    stages: list[nn.Sequential],
    reference: nn.Sequential,
    groups: MeshGroups,
    label: str,
    problems: list[str],
) -> int:
    """Compare one step's loss (averaged over dp, on the last stage's rank) and every
    gradient of this rank's stages with the reference's; return how many were compared."""
    compared = 0
    if loss is not None:
        mean = average_loss(loss, groups.dp_group)
        compared += _close(mean, ref_loss.detach(), f"{label} loss", problems)
    for stage, module in mine.items():
        first = sum(len(s) for s in stages[:stage])
        ref_module = reference[first : first + len(stages[stage])]
        compared += _compare_grads(
            module, ref_module, groups.tp_group, f"{label} stage {stage}", problems
        )
    return compared


def _check_saved(
    pipe: Pipeline,
    ids: torch.Tensor,
    stages: list[nn.Sequential],
    reference: nn.Sequential,
    label: str,
    problems: list[str],
) -> int:
    """Bytes saved for backward per micro-batch equal the unsharded stage's (FSDP's gathered
    weights are not activations)."""
    compared = 0
    for (stage, microbatch), nbytes in sorted(pipe.saved_bytes.items()):
        if microbatch:
            continue
        first = sum(len(s) for s in stages[:stage])
        ref_stage = reference[first : first + len(stages[stage])]
        x = ids if stage == 0 else torch.randn(*ids.shape, CONFIG.dim, requires_grad=True)
        with SavedBytes(ref_stage.parameters()) as saved:
            ref_stage(x)
        if nbytes != saved.nbytes:
            problems.append(
                f"{label} stage {stage}: saved {nbytes} bytes, unsharded {saved.nbytes}"
            )
        compared += 1
    return compared


def _compare_grads(
    module: nn.Module,
    reference: nn.Module,
    tp_group: dist.ProcessGroup,
    label: str,
    problems: list[str],
) -> int:
    """Compare every gradient of ``module`` (sharded ones gathered) with ``reference``'s.

    Also checks a replicated parameter's gradient is the same on every tp rank. A collective
    over ``tp_group``: every tp rank calls it with the same modules.
    """
    from torch.distributed.tensor import DTensor

    compared = 0
    pairs = zip(module.named_parameters(), reference.parameters(), strict=True)
    for (name, p), q in pairs:
        if p.grad is None or q.grad is None:
            problems.append(f"{label}: {name} has no gradient")
            continue
        grad = p.grad
        if isinstance(grad, DTensor):
            grad = grad.full_tensor()
        elif dist.get_world_size(tp_group) > 1:
            copies = [torch.empty_like(grad) for _ in range(dist.get_world_size(tp_group))]
            dist.all_gather(copies, grad.contiguous(), group=tp_group)
            for tp_rank, other in enumerate(copies):
                compared += _close(
                    grad, other, f"{label} {name} (replicated) vs tp rank {tp_rank}", problems
                )
        compared += _close(grad, q.grad, f"{label} {name}", problems)
    return compared


def check_llama_tp_rank(
    context: RankContext, heads: int = 4, kv_heads: int = 2, layers: int = 2
) -> list[str]:
    """Shard a tiny Llama's decoder layers over every rank; compare with the unsharded copy.

    Builds ``LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, ...)`` from seed
    0, runs its decoder layers (with the model's rotary position embeddings) on the same random
    input in both copies, and compares the output, the input gradient and every parameter's
    gradient. Returns the mismatches found on this rank.

    Raises:
        ConfigError: ``heads`` or ``kv_heads`` do not divide by the number of ranks.
    """
    from torch.distributed.device_mesh import init_device_mesh

    tp_mesh = init_device_mesh("cpu", (context.world_size,), mesh_dim_names=("tp",))
    return _check_llama(tp_mesh, f"llama rank {context.rank}", heads, kv_heads, layers)


class _AllReduceCount(TorchDispatchMode):
    """Counts the all-reduces dispatched inside it (DTensor's functional collectives).

    Not torch's ``CommDebugMode``: its module tracker loses its place in the Hugging Face
    decoder layers' backward (IndexError in torch 2.13 with transformers 5.25) and the test
    needs only the count.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        self.count = 0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if "all_reduce" in str(func):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _check_llama(
    tp_mesh: DeviceMesh, label: str, heads: int = 4, kv_heads: int = 2, layers: int = 2
) -> list[str]:
    """:func:`check_llama_tp_rank` on a given tp mesh (a collective over it)."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaModel(config)
        hidden = torch.randn(2, 8, config.hidden_size)
    reference = copy.deepcopy(model.layers)
    problems: list[str] = []
    if apply_tensor_parallel(model.layers, tp_mesh, llama_plan) != layers:
        problems.append(f"{label}: not every decoder layer was sharded")
    try:
        apply_tensor_parallel(model.layers, tp_mesh, llama_plan)
        problems.append(f"{label}: sharding the layers twice was not refused")
    except ConfigError:
        pass
    positions = torch.arange(hidden.shape[1]).unsqueeze(0)
    rotary = model.rotary_emb(hidden, positions)
    outputs = []
    with _AllReduceCount() as comms:
        for layers_run in (model.layers, reference):
            x = hidden.clone().requires_grad_()
            out = x
            for layer in layers_run:
                out = layer(out, position_embeddings=rotary, position_ids=positions)
            out.square().mean().backward()
            assert x.grad is not None, "the input got no gradient"
            outputs.append((out.detach(), x.grad))
    (out, grad), (ref_out, ref_grad) = outputs
    # Per layer: forward all-reduces after o_proj and down_proj; backward one per norm that
    # feeds column-parallel matmuls (q/k/v share one, gate/up another).
    if comms.count != 4 * layers:
        problems.append(f"{label}: {comms.count} all-reduces for {layers} layers, expected 4 each")
    compared = _close(out, ref_out, f"{label} output", problems)
    compared += _close(grad, ref_grad, f"{label} input gradient", problems)
    compared += _compare_grads(
        model.layers, reference, tp_mesh.get_group(), label, problems
    )
    if compared == 0:
        problems.append(f"{label}: nothing was compared")
    return problems
