"""A fault for the Ray Train tests: one worker exits once, so the run must recover from its checkpoint.

Handed to ``pipelines.train.run(cfg, on_epoch_start=...)``. Ray's workers
cannot import this test module by name, so :func:`exit_once` registers the
module to be pickled by value before the hook travels to them.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

from contracts.fs import exists, join, write_bytes

logger = logging.getLogger(__name__)

FAULT_MARKER = ".test_fault_fired"


@dataclass(frozen=True)
class ExitOnce:
    """The last worker exits at the start of ``epoch`` (0-based), once per run dir (a marker file remembers it).

    It first waits until Ray Train has committed the reports in flight: a
    worker that dies right after ``report`` can beat the controller to the
    checkpoint, and the run would then resume from the one before -- correct,
    but not the case the test wants to pin down.
    """

    run_dir: str
    epoch: int

    def __call__(self, epoch: int, rank: int, world_size: int) -> None:
        import ray.train

        if epoch != self.epoch or rank != world_size - 1:
            return
        marker = join(self.run_dir, FAULT_MARKER)
        if exists(marker):
            return
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        write_bytes(marker, b"")
        logger.warning("test fault: worker %d exits at the start of epoch %d", rank, epoch + 1)
        os._exit(1)


def exit_once(run_dir: str, epoch: int) -> ExitOnce:
    """The hook, with this module registered to travel by value to Ray's workers."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return ExitOnce(run_dir, epoch)
