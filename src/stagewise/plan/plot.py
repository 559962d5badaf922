"""The picture of a search: step time against memory per GPU, the limit drawn, the choice marked.

matplotlib is imported inside :func:`plot_plans`, so importing the planner does not load it.
"""

from __future__ import annotations

from pathlib import Path

from stagewise.plan.evaluate import Plan
from stagewise.plan.memory import GIB

__all__ = ["plot_plans"]


def plot_plans(plans: list[Plan], path: str | Path, chosen: Plan | None = None) -> Path:
    """Draw every plan (step time vs memory) to ``path`` and return the path.

    Plans that fit are blue, the others grey; the GPU's memory is a dashed vertical line; the
    chosen plan is a red star with its configuration written next to it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not plans:
        raise ValueError("no plans to draw")
    out = Path(path)
    figure, axes = plt.subplots(figsize=(9, 6))
    for fits, colour, label in ((True, "tab:blue", "fits"), (False, "0.6", "does not fit")):
        group = [p for p in plans if p.fits is fits]
        if group:
            axes.scatter(
                [p.memory.total / GIB for p in group],
                [p.time.step_s for p in group],
                s=12, c=colour, alpha=0.7, label=f"{label} ({len(group)})",
            )
    limit = plans[0].cluster.gpu.memory_gib
    axes.axvline(limit, color="tab:red", linestyle="--",
                 label=f"{plans[0].cluster.gpu.name}: {limit:g} GiB")
    if chosen is not None:
        x, y = chosen.memory.total / GIB, chosen.time.step_s
        axes.scatter([x], [y], marker="*", s=250, c="tab:red", zorder=5, label="chosen")
        axes.annotate(chosen.config.describe(), (x, y), textcoords="offset points",
                      xytext=(8, 8), fontsize=8)
    axes.set_yscale("log")
    axes.set_xlabel("memory per GPU, most loaded rank (GiB)")
    axes.set_ylabel("step time (s, log scale)")
    first = plans[0]
    axes.set_title(
        f"{first.model.name} on {first.cluster.nodes} x {first.cluster.gpus_per_node} "
        f"{first.cluster.gpu.name}: seq {first.training.seq_len}, global batch "
        f"{first.training.global_batch}"
    )
    axes.legend(loc="best", fontsize=8)
    axes.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return out
