"""Pictures of a Timeline: Gantt charts (PNG/SVG), activation memory, Chrome/Perfetto traces.

Importing this package is cheap: matplotlib is imported only when a picture is drawn.
"""

from stagewise.viz.gantt import compare_timelines, plot_timeline

__all__ = ["compare_timelines", "plot_timeline"]
