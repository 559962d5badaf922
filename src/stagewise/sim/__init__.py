"""Costs, the event simulator, the Timeline it produces, and closed-form bubble maths.

Pure Python; importing this package does not import torch.
"""

from stagewise.sim.costs import Costs, Link
from stagewise.sim.simulate import simulate
from stagewise.sim.timeline import Bubble, Event, RankStats, Timeline

__all__ = ["Bubble", "Costs", "Event", "Link", "RankStats", "Timeline", "simulate"]
