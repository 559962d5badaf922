"""Training with any schedule on a pp x dp x tp mesh: ``stagewise train`` underneath.

:func:`prepare` turns a :class:`~stagewise.runconfig.RunConfig` into a checked :class:`Job`;
:func:`train` launches it (local processes, or this torchrun process) and returns rank 0's
:class:`TrainReport`. Importing this package imports torch.

Example::

    from stagewise.runconfig import Mesh, RunConfig
    from stagewise.train import prepare, train

    report = train(prepare(RunConfig(mesh=Mesh(pp=2))), torchrun=False)
    print(report.losses[-1], report.measured_bubble)
"""

from stagewise.train.job import Job, prepare
from stagewise.train.report import TrainReport
from stagewise.train.results import RankResult, StepRecord
from stagewise.train.trainer import train, train_rank

__all__ = ["Job", "RankResult", "StepRecord", "TrainReport", "prepare", "train", "train_rank"]
