"""Test helpers for explaind_math and for authors of extensions (new optimizers, targets, models).

* :mod:`explaind_math.testing.strategies` — Hypothesis strategies for random tiny models, optimizer
  settings and training schedules, and :func:`~explaind_math.testing.strategies.train_and_record`,
  which runs a real training loop with an unmodified torch optimizer and the trajectory recorder.
* :mod:`explaind_math.testing.residuals` — named tolerances, the checks every exact theorem must pass,
  and a log of the residuals achieved per model family.
* :mod:`explaind_math.testing.comparisons` — two recordings of one run compared bit for bit.
* :mod:`explaind_math.testing.rule_checks` — the shared checks every optimizer rule must pass
  (``python -m explaind_math verify-rule``); not imported here.
* :mod:`explaind_math.testing.sharded_runs` — a small recorded run that can crash at a chosen moment
  (``os._exit``) and be resumed from its trajectory directory; not imported here.

Importing this package requires ``hypothesis`` (the ``test`` extra).
"""

from . import residuals, strategies
from .residuals import ResidualLog, assert_exact, check_certificate, report_residual
from .strategies import RunSpec, TrainedRun, decompose, train_and_record

__all__ = [
    "strategies",
    "residuals",
    "ResidualLog",
    "assert_exact",
    "check_certificate",
    "report_residual",
    "RunSpec",
    "TrainedRun",
    "decompose",
    "train_and_record",
]
