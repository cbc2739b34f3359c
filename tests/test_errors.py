"""Finding the user's error behind the wrappers Ray puts around it."""

from __future__ import annotations

from models.errors import HashrayError, find_cause


class TaskError(HashrayError):
    """Stands in for Ray's RayTaskError(HashrayError): a subclass whose message is a traceback."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__("ray::task() (pid=1)\nTraceback ...")
        self.cause = cause


class TrainingFailed(RuntimeError):
    """Stands in for Ray Train's error: one error per failed worker."""

    def __init__(self, failures: dict[int, BaseException]) -> None:
        super().__init__("training failed")
        self.worker_failures = failures


def test_the_original_is_found_behind_a_task_wrapper() -> None:
    original = HashrayError("data/train/part-1.parquet: damaged Parquet file")
    assert find_cause(TaskError(original)) is original


def test_worker_failures_and_chained_causes_are_followed() -> None:
    original = HashrayError("one line")
    try:
        try:
            raise TaskError(original)
        except HashrayError as error:
            raise RuntimeError("wrapped") from error
    except RuntimeError as wrapped:
        failed = TrainingFailed({0: ValueError("other worker"), 1: wrapped})
    assert find_cause(failed) is original
    assert find_cause(failed, OSError) is None


def test_an_error_with_no_user_error_behind_it_gives_none() -> None:
    assert find_cause(RuntimeError("plain")) is None
    storage = OSError("AWS Error NETWORK_CONNECTION")
    assert find_cause(RuntimeError("job failed"), OSError) is None
    chained = RuntimeError("job failed")
    chained.__cause__ = storage
    assert find_cause(chained, OSError) is storage
