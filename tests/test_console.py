"""What a job's console shows (segr1.train.console) and the vLLM warnings dropped at their source
(actors.vllm_worker); the whole job's console is checked in test_run.py's submitted job."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from collections.abc import Iterator

import pytest
import ray
from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

from actors.vllm_worker import quiet_known_vllm_noise
from segr1.train.console import RAY_PRINTER, Console, shown_on_console

VLLM_LINES = [  # as a rollout actor forwards them (in-process engine)
    "(MainProcess pid=7) INFO 12-02 01:24:55 [api_utils.py:286] non-default args: {'dtype': 'float32'}",
    "(MainProcess pid=7) WARNING 12-02 01:24:57 [cpu_worker.py:114] libtcmalloc is not found in LD_PRELOAD.",
    "Loading safetensors checkpoint shards: 100% Completed | 1/1 [00:00<00:00, 273.08it/s]",
    "/venv/lib/python3.11/site-packages/vllm/triton_utils/dispatcher.py:138: FutureWarning: `reduce_op` is deprecated",
]
ERROR_LINES = [
    "(MainProcess pid=7) ERROR 12-02 01:25:03 [core.py:1] EngineCore failed to start.",
    "ValueError: group g3: the rollout engine's prompt has 13 tokens",
    "/work/h5/segr1/core/frames.py:40: UserWarning: an image of 1 px",
]


def test_the_quiet_console_keeps_error_lines_and_our_warnings_only():
    assert [line for line in VLLM_LINES + ERROR_LINES if shown_on_console(line)] == ERROR_LINES


@pytest.fixture
def ray_printer(monkeypatch):
    """Ray's printer of forwarded worker lines as a recorder, registered as Ray registers its own."""
    printed: list[dict] = []
    saved = list(dispatcher.handlers)
    dispatcher.handlers = [(RAY_PRINTER, printed.append)]
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    yield printed
    dispatcher.handlers = saved


def _batch(pid: str, lines: list[str], actor: str = "RolloutActor") -> dict:
    return {"ip": "127.0.0.1", "localhost": "127.0.0.1", "pid": pid, "is_err": True, "lines": lines,
            "actor_name": actor, "task_name": ""}


@pytest.mark.parametrize("verbose", [False, True])
def test_role_lines_go_to_one_file_per_process_and_only_errors_to_the_console(tmp_path, ray_printer, verbose):
    console = Console(tmp_path / "logs", verbose=verbose)
    assert console.follow_workers()
    dispatcher.emit(_batch("7", VLLM_LINES + ERROR_LINES[:1]))
    dispatcher.emit(_batch("9", ["Loading weights: 100%"], actor="LearnerWorker"))
    dispatcher.emit(_batch("raylet", ["A worker died or was killed while executing a task."], actor=""))
    console.close()

    assert (tmp_path / "logs" / "RolloutActor-7.log").read_text().splitlines() == VLLM_LINES + ERROR_LINES[:1]
    assert (tmp_path / "logs" / "LearnerWorker-9.log").read_text() == "Loading weights: 100%\n"
    printed = [line for batch in ray_printer for line in batch["lines"]]
    raylet = ["A worker died or was killed while executing a task."]
    if verbose:
        assert printed == VLLM_LINES + ERROR_LINES[:1] + ["Loading weights: 100%"] + raylet
    else:
        assert printed == ERROR_LINES[:1] + raylet  # Ray's own messages always reach the console
    assert [name for name, _ in dispatcher.handlers] == [RAY_PRINTER]  # Ray's printer is back


def test_without_forwarded_worker_lines_the_console_leaves_ray_alone(tmp_path, ray_printer):
    dispatcher.handlers = []  # ray.init(log_to_driver=False): Ray registers no printer
    console = Console(tmp_path / "logs")
    assert not console.follow_workers()
    console.close()
    assert dispatcher.handlers == []


@contextlib.contextmanager
def _driver_logging(monkeypatch) -> Iterator[tuple[logging.Handler, io.StringIO]]:
    """The driver's logging as segr1.run sets it up: INFO records to a stderr handler on the root,
    and one on Ray's logger (which does not propagate) as Ray has; stderr is a buffer, set in the
    test itself (pytest resets it between a test's phases)."""
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    root, ray_logger = logging.getLogger(), logging.getLogger("ray")
    handler, ray_handler = logging.StreamHandler(stderr), logging.StreamHandler(stderr)
    level = root.level
    root.addHandler(handler)
    ray_logger.addHandler(ray_handler)
    root.setLevel(logging.INFO)
    try:
        yield handler, stderr
    finally:
        root.removeHandler(handler)
        ray_logger.removeHandler(ray_handler)
        root.setLevel(level)


def test_the_driver_console_shows_segr1_and_errors_and_driver_log_holds_everything(tmp_path, monkeypatch):
    from transformers.utils import logging as hf_logging

    library = hf_logging.get_logger("transformers.processing")  # transformers' own handler, not propagating
    with _driver_logging(monkeypatch) as (handler, stderr):
        before = list(logging.getLogger().handlers)
        console = Console(tmp_path / "logs")
        logging.getLogger("segr1").info("step 1 reward=0.5")
        library.warning("a library's warning")
        logging.getLogger("ray").info("Started a local Ray instance.")
        logging.getLogger("ray").error("a Ray error")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn_explicit("deprecated thing", FutureWarning, "/venv/site-packages/lib/x.py", 3)
        console.close()
        logging.getLogger("segr1").info("after the job")
        assert sorted(map(id, logging.getLogger().handlers)) == sorted(map(id, before))  # as before the job
        assert not hf_logging.get_logger("transformers").propagate

    shown = stderr.getvalue()
    assert "step 1 reward=0.5" in shown and "a Ray error" in shown and "after the job" in shown
    assert "a library's warning" not in shown and "Started a local Ray instance" not in shown
    assert "deprecated thing" not in shown
    kept = (tmp_path / "logs" / "driver.log").read_text()
    for text in ("step 1 reward=0.5", "a library's warning", "Started a local Ray instance", "a Ray error",
                 "FutureWarning: deprecated thing"):
        assert text in kept
    assert "after the job" not in kept


def _record(logger: str, msg: str, *args: object) -> logging.LogRecord:
    return logging.getLogger(logger).makeRecord(logger, logging.WARNING, "x.py", 1, msg, args, None)


def test_two_vllm_warnings_from_vllms_own_code_are_dropped_at_their_loggers():
    """``set_num_threads``: vLLM's CPU worker replaced it, its renderer calls it per image (kept
    once); "Failed to load weights" of layers holding only computed buffers (a real one is kept)."""
    quiet_known_vllm_noise()
    quiet_known_vllm_noise()  # once per logger, however often it is called
    threads = logging.getLogger("vllm.v1.worker.cpu_worker")
    reload = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    assert len(threads.filters) == len(reload.filters) == 1
    message = "CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding, skip it."
    assert [threads.filter(_record(threads.name, message)) for _ in range(3)] == [True, False, False]
    failed = "%s: Failed to load weights"
    assert not reload.filter(_record(reload.name, failed, "MRotaryEmbedding"))
    assert not reload.filter(_record(reload.name, failed, "FusedMMInputNorm"))
    assert reload.filter(_record(reload.name, failed, "QKVParallelLinear"))
    assert threads.filter(_record(threads.name, "libtcmalloc is not found in LD_PRELOAD."))
