"""Split a stage's backward into its input-gradient part (I) and weight-gradient part (W).

Zero-bubble schedules run I as soon as the next stage's gradient arrives (the previous stage is
waiting for it) and defer W to fill idle time. Both parts work on ordinary modules, with no
custom autograd function:

- I computes only the gradient of the stage input: ``torch.autograd.grad`` with respect to the
  input, keeping the graph. The autograd engine skips every branch that leads only to
  parameters, so the weight matmuls are not done here.
- Before I runs, the graph is searched for the nodes where the two parts fork: nodes on the
  path to the input that also have an edge leading (only) to parameters. A pre-hook on each
  fork node records the gradient that reaches it during I.
- W restarts autograd from those fork nodes with the recorded gradients, with respect to the
  parameters only, and adds the result into each parameter's ``.grad``.

When the input does not lead back into the graph (stage 0 fed with token ids), I has nothing to
compute and W is the whole backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.autograd.graph import GradientEdge, Node

__all__ = ["WeightGrad", "backward_input"]


@dataclass
class _Part:
    """One autograd call of W: from ``outputs`` (with ``grads``) to ``params``."""

    outputs: list[torch.Tensor | GradientEdge]
    grads: list[torch.Tensor | None]
    params: list[torch.Tensor]


@dataclass
class WeightGrad:
    """The deferred W of one micro-batch through one stage; :meth:`run` it exactly once."""

    parts: list[_Part] = field(default_factory=list)

    def run(self) -> None:
        """Compute the weight gradients, add them into ``.grad``, and drop the graph."""
        for part in self.parts:
            # Accumulates straight into each parameter's .grad; the graph stays for later parts.
            torch.autograd.backward(
                part.outputs,  # type: ignore[arg-type]  # tensors and edges mix fine at runtime
                part.grads,
                retain_graph=True,
                inputs=part.params,
            )
        self.parts = []


def backward_input(
    output: torch.Tensor,
    grad_output: torch.Tensor | None,
    stage_input: torch.Tensor | None,
    params: Sequence[torch.Tensor],
) -> tuple[torch.Tensor | None, WeightGrad]:
    """Run I: the gradient of ``stage_input`` only; return it and the deferred W.

    Args:
        output: the stage's output (or the scaled loss on the last stage).
        grad_output: the gradient of ``output`` (``None`` for a scalar loss).
        stage_input: the leaf tensor the stage's forward started from, or ``None`` when the
            input needs no gradient (token ids into stage 0).
        params: the stage's parameters.

    Returns:
        ``(input_grad, weight_grad)``; ``input_grad`` is ``None`` when there is no input to
        differentiate, zeros when the output does not depend on the input.
    """
    wanted = [p for p in params if p.requires_grad]
    whole = WeightGrad([_Part([output], [grad_output], wanted)] if wanted else [])
    root = output.grad_fn
    input_node = _leaf_node(stage_input)
    if root is None or input_node is None:
        # Nothing flows back to the input: W is the whole backward.
        return None, whole
    assert stage_input is not None
    by_node: dict[Node, torch.Tensor] = {}
    for param in wanted:
        node = _leaf_node(param)
        if node is not None:
            by_node[node] = param
    forks = _fork_nodes(root, input_node, set(by_node))
    captured: dict[Node, tuple[torch.Tensor | None, ...]] = {}
    handles = [fork.register_prehook(_recorder(captured, fork)) for fork in forks or ()]
    try:
        (input_grad,) = torch.autograd.grad(
            output, [stage_input], grad_output, retain_graph=True, allow_unused=True
        )
    finally:
        for handle in handles:
            handle.remove()
    if input_grad is None:
        input_grad = torch.zeros_like(stage_input)
    if forks is None:
        # A parameter used at two depths (shared weights), or an output independent of the
        # input: W re-runs the whole backward on the retained graph, still exact, only slower.
        return input_grad, whole
    parts = []
    for fork, fork_params in forks.items():
        grads = captured.get(fork, ())
        edges = [GradientEdge(fork, i) for i, g in enumerate(grads) if g is not None]
        if edges and fork_params:
            present = [g for g in grads if g is not None]
            parts.append(_Part(list(edges), list(present), [by_node[n] for n in fork_params]))
    return input_grad, WeightGrad(parts)


def _recorder(
    captured: dict[Node, tuple[torch.Tensor | None, ...]], node: Node
) -> Callable[[tuple[torch.Tensor | None, ...]], None]:
    def hook(grad_outputs: tuple[torch.Tensor | None, ...]) -> None:
        captured[node] = tuple(grad_outputs)

    return hook


def _leaf_node(tensor: torch.Tensor | None) -> Node | None:
    """The AccumulateGrad node of a leaf tensor that requires grad, else None."""
    if tensor is None or not tensor.requires_grad or tensor.grad_fn is not None:
        return None
    return torch.autograd.graph.get_gradient_edge(tensor).node


def _fork_nodes(
    root: Node, input_node: Node, param_nodes: set[Node]
) -> dict[Node, list[Node]] | None:
    """Fork nodes mapped to the parameter nodes each one alone leads to.

    A fork node lies on the path to the input and has a child leading only to parameters.
    Returns None when some parameter is reached from two fork nodes (a weight used twice) or
    the output does not depend on the input; W then re-runs the whole backward.
    """
    order = _post_order(root)
    reaches_input: dict[Node, bool] = {}
    params_below: dict[Node, frozenset[Node]] = {}
    for node in order:  # children before parents
        children = [fn for fn, _ in node.next_functions if fn is not None]
        reaches_input[node] = node is input_node or any(reaches_input[c] for c in children)
        below = {node} & param_nodes
        for child in children:
            below |= params_below[child]
        params_below[node] = frozenset(below)
    if not reaches_input[root]:
        return None  # the output does not depend on the input: W is the whole backward
    forks: dict[Node, list[Node]] = {}
    owner: dict[Node, Node] = {}
    for node in order:
        if not reaches_input[node]:
            continue
        mine: set[Node] = set()
        for below_node, _ in node.next_functions:
            if below_node is not None and not reaches_input[below_node]:
                mine |= params_below[below_node]
        for param in mine:
            if owner.setdefault(param, node) is not node:
                return None
        if mine:
            forks[node] = sorted(mine, key=id)
    return forks


def _post_order(root: Node) -> list[Node]:
    """Every node reachable from ``root``, each after all of its children (iteratively)."""
    seen: set[Node] = {root}
    order: list[Node] = []
    stack: list[tuple[Node, int]] = [(root, 0)]
    while stack:
        node, index = stack.pop()
        children = node.next_functions
        if index < len(children):
            stack.append((node, index + 1))
            child = children[index][0]
            if child is not None and child not in seen:
                seen.add(child)
                stack.append((child, 0))
        else:
            order.append(node)
    return order
