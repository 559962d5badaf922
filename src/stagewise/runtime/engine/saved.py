"""Count the bytes autograd saves for backward during a forward (activation memory).

``saved_tensors_hooks`` sees every tensor an operation keeps for its backward. A storage is
counted once however many ops save views of it, and parameters are not activations, so their
storages are left out: those of the parameters given, and any parameter (or view of one)
autograd saves, which covers weights FSDP gathers for the forward into fresh storage and frees
after it. A ``DTensor`` (tensor parallelism) counts its local shard's storage.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType

import torch
from torch import nn

__all__ = ["SavedBytes"]


class SavedBytes:
    """Context manager: inside it, ``nbytes`` grows by each new storage saved for backward.

    Example:
        >>> layer = torch.nn.Linear(4, 4)
        >>> with SavedBytes(layer.parameters()) as saved:
        ...     _ = layer(torch.ones(2, 4, requires_grad=True))
        >>> saved.nbytes  # the input, 2 x 4 float32
        32
    """

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self.nbytes = 0
        self._skip = {_storage(p).data_ptr() for p in params}
        self._seen: set[int] = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter):
            return tensor
        storage = _storage(tensor)
        pointer = storage.data_ptr()
        if pointer not in self._skip and pointer not in self._seen:
            self._seen.add(pointer)
            self.nbytes += storage.nbytes()
        return tensor

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._hooks.__exit__(kind, error, trace)


def _storage(tensor: torch.Tensor) -> torch.UntypedStorage:
    """The storage of ``tensor``, or of its local shard when it is a ``DTensor``."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        with torch.no_grad():
            tensor = tensor.to_local()
    return tensor.untyped_storage()
