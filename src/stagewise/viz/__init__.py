"""Pictures of a Timeline: Gantt charts (PNG/SVG), activation memory, Chrome/Perfetto traces.

Importing this package is cheap: matplotlib is imported only when a picture is drawn.

- :func:`plot_timeline`: the pipeline Gantt chart (ranks as rows, F/B/I/W boxes).
- :func:`compare_timelines`: predicted over measured, two Gantt charts on one time axis.
- :func:`plot_memory`: live activations per rank over the step, peaks marked.
- :func:`chrome_trace` / :func:`write_chrome_trace`: trace JSON for ui.perfetto.dev.
"""

from stagewise.viz._common import SUPPORTED_SUFFIXES
from stagewise.viz.gantt import compare_timelines, plot_timeline
from stagewise.viz.memory import plot_memory
from stagewise.viz.trace import chrome_trace, write_chrome_trace

__all__ = [
    "SUPPORTED_SUFFIXES",
    "chrome_trace",
    "compare_timelines",
    "plot_memory",
    "plot_timeline",
    "write_chrome_trace",
]
