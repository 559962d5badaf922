"""Building modules with meta parameters, and filling them per name (runtime.lazy_init)."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from stagewise.runtime.models.lazy_init import Materializer, empty_parameters, is_empty  # noqa: E402


def test_only_the_calling_thread_builds_empty_and_the_patch_is_removed() -> None:
    inside, done = threading.Event(), threading.Event()
    seen: dict[str, str] = {}

    def other() -> None:
        with empty_parameters():
            seen["other"] = nn.Linear(2, 2).weight.device.type
            inside.set()
            done.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    assert inside.wait(10)
    seen["main, meanwhile"] = nn.Linear(2, 2).weight.device.type
    with empty_parameters():  # overlapping blocks: this one ends first
        with empty_parameters():
            seen["main, nested"] = nn.Linear(2, 2).weight.device.type
        done.set()
        thread.join(10)
        seen["main, after the other ended"] = nn.Linear(2, 2).weight.device.type
    seen["after both"] = nn.Linear(2, 2).weight.device.type
    assert seen == {"other": "meta", "main, meanwhile": "cpu", "main, nested": "meta",
                    "main, after the other ended": "meta", "after both": "cpu"}
    assert nn.Module.register_parameter.__name__ == "register_parameter"


def test_fill_is_per_name_whatever_the_order_and_ties_stay_shared() -> None:
    def build() -> nn.Sequential:
        with empty_parameters():
            net = nn.Sequential(nn.Embedding(5, 3), nn.LayerNorm(3), nn.Linear(3, 5))
            net[2].weight = net[0].weight  # tied
        return net

    forward, backward = build(), build()
    Materializer(forward, seed=1, std=0.5)([forward])
    fill = Materializer(backward, seed=1, std=0.5)
    fill([backward[2]])
    assert is_empty(backward[1])
    assert not is_empty(backward[2])
    fill([backward[1], backward[0]])
    for (name, p), q in zip(forward.named_parameters(), backward.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert backward[0].weight is backward[2].weight
    assert torch.equal(backward[1].weight, torch.ones(3))
    assert torch.equal(backward[2].bias, torch.zeros(5))
    other = build()
    Materializer(other, seed=2, std=0.5)([other])
    assert not torch.equal(other[0].weight, forward[0].weight)  # another seed, other values


def test_filled_parameters_are_not_kept_alive_unless_tied() -> None:
    """A rank fills a layer, then shards or moves it: the whole tensor must be freeable."""
    import gc
    import weakref

    with empty_parameters():
        net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    fill = Materializer(net, seed=0, std=0.1)
    fill([net[0]])
    whole = weakref.ref(net[0].weight)
    net[0].weight = nn.Parameter(torch.zeros(2, 4))  # as sharding replaces it
    gc.collect()
    assert whole() is None
