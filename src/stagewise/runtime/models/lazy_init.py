"""Build a model without its weights, then give each rank only the layers it holds.

A big model built whole on every rank (a 70B Llama is 280 GB in float32) does not fit before the
partitioner has even cut it. :func:`empty_parameters` builds any module with its parameters on
the ``meta`` device (shapes and dtypes only, no memory; buffers such as rotary frequencies are
built for real, they are small), so the partitioner can count parameters and the checks can read
shapes; :func:`materialize` then fills in the parameters of the modules a rank keeps.

Values do not depend on which modules are filled, or in which order, or on the layout: each
parameter is drawn from its own generator, seeded by the run's seed and the parameter's name in
the whole model (the first name, for a parameter the model holds twice, such as tied
embeddings). The rule, the one the Hugging Face models themselves use for their Linear and
Embedding weights: a weight of two or more dimensions is normal with standard deviation
``std`` (the config's ``initializer_range``), a bias is zero, any other 1-D parameter (a norm's
weight) is one. The whole model filled this way is the single-process reference the tests
compare a pipeline with.
"""

from __future__ import annotations

import contextlib
import threading
import zlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

__all__ = ["Materializer", "empty_parameters", "is_empty", "materialize"]


_state = threading.local()  # .depth: how many empty_parameters blocks this thread is in
_lock = threading.Lock()
_users = 0  # threads inside a block, all of them (the patch is installed while any is)
_original = nn.Module.register_parameter


def _register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    if getattr(_state, "depth", 0) and param is not None and param.device.type != "meta":
        param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    _original(module, name, param)


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Within the block, every parameter a module registers is moved to the meta device.

    Only the calling thread is affected (other threads build real modules meanwhile), and
    blocks may nest. A parameter that is already on meta is kept as it is, so a weight
    assigned to a second module (tied embeddings) stays the same Parameter object.

    Example:
        >>> with empty_parameters():
        ...     layer = nn.Linear(4, 3)
        >>> layer.weight.device.type, tuple(layer.weight.shape)
        ('meta', (3, 4))
    """
    global _users
    with _lock:
        if _users == 0:
            nn.Module.register_parameter = _register  # type: ignore[method-assign,assignment]
        _users += 1
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
        with _lock:
            _users -= 1
            if _users == 0:
                nn.Module.register_parameter = _original  # type: ignore[method-assign]


def is_empty(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is still on the meta device."""
    return any(p.device.type == "meta" for p in module.parameters())


class Materializer:
    """Fills the meta parameters of parts of ``model`` (see the module's docstring).

    Args:
        model: the whole model, built under :func:`empty_parameters`; its parameter names are
            the keys of the draws.
        seed: the run's seed.
        std: the standard deviation of weights with two or more dimensions.
    """

    def __init__(self, model: nn.Module, seed: int, std: float) -> None:
        self.names = {id(p): name for name, p in model.named_parameters()}
        uses: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
        self._shared = {key for key, count in uses.items() if count > 1}
        self.seed = seed
        self.std = std
        # A parameter held by two modules (a tie) -> its real one, so both get the same object.
        # Only those are kept: a filled layer sharded or moved afterwards must not stay alive.
        self._filled: dict[int, nn.Parameter] = {}

    def __call__(self, modules: Iterable[nn.Module]) -> None:
        """Fill every meta parameter inside ``modules`` (on the CPU), in place."""
        for module in modules:
            for owner in module.modules():
                for key, param in list(owner._parameters.items()):
                    if param is None or param.device.type != "meta":
                        continue
                    real = self._filled.get(id(param))
                    if real is None:
                        real = self._draw(param)
                        if id(param) in self._shared:
                            self._filled[id(param)] = real
                    owner._parameters[key] = real

    def _draw(self, param: nn.Parameter) -> nn.Parameter:
        name = self.names.get(id(param))
        if name is None:
            raise ValueError("a meta parameter that is not the model's: materialize the model's "
                             "own modules")
        value = torch.empty(param.shape, dtype=param.dtype)
        if param.dim() >= 2:
            generator = torch.Generator().manual_seed(_key(self.seed, name))
            value.normal_(0.0, self.std, generator=generator)
        elif name.endswith("bias"):
            value.zero_()
        else:
            value.fill_(1.0)
        return nn.Parameter(value, requires_grad=param.requires_grad)


def materialize(model: nn.Module, seed: int, std: float) -> nn.Module:
    """Fill every meta parameter of ``model`` (see :class:`Materializer`); returns ``model``.

    Example:
        >>> with empty_parameters():
        ...     net = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
        >>> net = materialize(net, seed=0, std=0.02)
        >>> net[1].weight.tolist(), net[0].bias.tolist()
        ([1.0, 1.0], [0.0, 0.0])
    """
    Materializer(model, seed, std)([model])
    return model


def _key(seed: int, name: str) -> int:
    """A generator seed from the run's seed and a parameter name (stable across processes)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
