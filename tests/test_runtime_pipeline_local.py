"""Pipeline on a one-rank process group, in this process: input errors, and every stage local.

With one rank all hand-offs between stages are local (no point-to-point), which checks the
same-rank path and split backward without spawning processes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from stagewise.errors import ConfigError  # noqa: E402
from stagewise.runtime import Pipeline, RankContext  # noqa: E402
from stagewise.runtime.models.tiny_gpt import lm_loss  # noqa: E402
from stagewise.schedules import Schedule, build  # noqa: E402
from workers.pipeline import Case, check_rank  # noqa: E402

# Three stages on one rank, backward split into I and W, W of micro-batch 0 deferred past the
# forward of micro-batch 1.
LOCAL_SPLIT = "0F0,1F0,2F0,2I0,1I0,0I0,0F1,1F1,2F1,2W0,1W0,0W0,2I1,1I1,0I1,0W1,1W1,2W1\n"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[dist.Store]:
    file_store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=file_store, rank=0, world_size=1)
    try:
        yield file_store
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_every_stage_on_one_rank_matches_single_process(store: dist.Store) -> None:
    context = RankContext(rank=0, world_size=1, store=store, local=True)
    cases = [
        Case(Schedule.from_csv(LOCAL_SPLIT, "local-split"), batch_size=3),
        Case(build("1f1b", num_ranks=1, num_microbatches=3), batch_size=5),
        Case(Schedule.from_csv(LOCAL_SPLIT, "local-split"), batch_size=4, tied=True),
    ]
    results = check_rank(context, cases)
    assert all(problems == [] for problems in results.values()), results


@pytest.mark.timeout(60)
def test_input_mistakes_are_config_errors(store: dist.Store) -> None:
    one = build("1f1b", num_ranks=1, num_microbatches=2)
    with pytest.raises(ConfigError, match=r"holds stages \[0\].*given stages \[0, 1\]"):
        Pipeline(one, {0: nn.Linear(2, 2), 1: nn.Linear(2, 2)}, lm_loss)
    with pytest.raises(ConfigError, match="has 2 ranks but the process group has 1"):
        Pipeline(build("1f1b", num_ranks=2, num_microbatches=2), {0: nn.Linear(2, 2)}, lm_loss)
    with pytest.raises(ConfigError, match="pass loss_fn"):
        Pipeline(one, {0: nn.Linear(2, 2)})
    pipe = Pipeline(one, {0: nn.Linear(2, 2)}, nn.functional.mse_loss)
    with pytest.raises(ConfigError, match="pass the inputs"):
        pipe.step(None, torch.zeros(4, 2))
    with pytest.raises(ConfigError, match="1 rows along dimension 0 but the schedule runs 2"):
        pipe.step(torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(ConfigError, match=r"tie .* must name at least two stages"):
        Pipeline(one, {0: nn.Linear(2, 2)}, lm_loss, tied=[{0: "weight"}])
    with pytest.raises(ConfigError, match="no parameter 'nope' to tie: its parameters are"):
        Pipeline(Schedule.from_csv(LOCAL_SPLIT), {s: nn.Linear(2, 2) for s in range(3)},
                 lm_loss, tied=[{0: "nope", 2: "weight"}])
    loss = pipe.step(torch.ones(4, 2), torch.zeros(4, 2))
    assert loss is not None
    assert loss.ndim == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rows", ["0F0,1F0,1B0,0B0,0F1,1F1,1B1,0B1",
                                  "0F0,1F0,1I0,0I0,1W0,0W0,0F1,1F1,1I1,1W1,0I1,0W1"])
def test_a_frozen_first_stage_gets_no_gradient_and_the_rest_match(
    store: dist.Store, rows: str
) -> None:
    torch.manual_seed(0)
    frozen = nn.Sequential(nn.Embedding(10, 8))
    frozen.requires_grad_(False)
    head = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 10))
    reference = nn.Sequential(*[copy.deepcopy(m) for m in (frozen, head)])
    pipe = Pipeline(Schedule.from_csv(rows + "\n"), {0: frozen, 1: head}, lm_loss)
    inputs, targets = torch.randint(0, 10, (4, 3)), torch.randint(0, 10, (4, 3))
    loss = pipe.step(inputs, targets)
    expected = lm_loss(reference(inputs), targets)
    expected.backward()
    assert loss is not None
    torch.testing.assert_close(loss, expected.detach())
    for p, q in zip(head.parameters(), reference[1].parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    assert all(p.grad is None for p in frozen.parameters())
