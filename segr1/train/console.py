"""What a job's console shows: segr1's progress bar and step lines, and errors; the rest goes to
files under ``<run>/logs/``.

Ray forwards every actor's stdout and stderr to the driver (``log_to_driver``), and vLLM, DeepSpeed,
transformers and Ray write a great deal there: engine configs, kernel notes, progress bars of
weight loading, deprecation warnings. Unless ``monitor.verbose`` is on, ``Console``:

- writes the lines of each role process to ``logs/<ActorClass>-<pid>.log`` (a restarted actor is
  a new process, hence a new file) and passes on to the console only the error lines among them
  (vLLM's ``ERROR``, an exception's last line) and Python warnings raised in segr1's own code;
  Ray's own messages (the raylet's: a worker died, memory ran out; the autoscaler's events) always
  pass, through Ray's own printer, which prefixes and deduplicates them as before;
- writes every log record of the driver process to ``logs/driver.log`` and Python warnings with
  them, while the console shows segr1's records (step lines, checkpoints, the summary) and
  anyone's errors; log lines are written above the progress bar rather than through it.

With ``verbose`` the console shows everything, as without this class, and the files are written
all the same. Ray's own log files (``/tmp/ray/session_*/logs``) are untouched; these are copies
kept with the run. Worker lines reach the driver only when Ray forwards them (``log_to_driver``,
its default; a driver that turned it off gets only driver.log here).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
RAY_PRINTER = "ray_print_logs"  # the name Ray registers its printer of forwarded worker lines under
ROUTER = "segr1_console"

# Lines of a role process the console still shows: a log record at error level (vLLM, Python
# logging), the last line of a Python traceback ("ValueError: ..."), or a warning raised in our code.
ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL|FATAL)\b|^\s*\w+(\.\w+)*(Error|Exception): ")
OUR_WARNING = re.compile(r"\b(segr1|actors|learner)/[\w/]+\.py:\d+: \w*Warning\b")


def shown_on_console(line: str) -> bool:
    """Whether a line of a role process reaches the quiet console."""
    return bool(ERROR_LINE.search(line) or OUR_WARNING.search(line))


class _ConsoleRecords(logging.Filter):
    """The driver's records the quiet console shows: segr1's, our code's warnings, anyone's errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or record.name == "segr1" or record.name.startswith("segr1."):
            return True
        return record.name == "py.warnings" and bool(OUR_WARNING.search(record.getMessage()))


class _AboveTheBar(logging.StreamHandler):
    """A console handler that writes through ``tqdm.write``, so a line lands above the progress
    bar instead of being glued to the end of it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


class _DriverLog(logging.FileHandler):
    """driver.log, in segr1's format: ``ray.init`` sets its own on every handler of the "ray" logger."""

    def setFormatter(self, fmt: logging.Formatter | None) -> None:  # noqa: N802 - logging's name
        if self.formatter is None:
            super().setFormatter(fmt)


class Console:
    """Routes the job's output (see the module doc) from creation until ``close``.

    Created before the driver connects to Ray (so Ray's start-up lines are routed too);
    ``follow_workers`` takes over Ray's printer of worker lines once connected.
    """

    def __init__(self, logs_dir: Path, verbose: bool = False) -> None:
        self.logs_dir = logs_dir
        self.verbose = verbose
        logs_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._files: dict[str, TextIO] = {}
        self._ray_printer: Any = None
        self._driver_log = _DriverLog(logs_dir / "driver.log")
        self._driver_log.setFormatter(logging.Formatter(FORMAT))
        self._swapped: list[tuple[logging.Handler, logging.Handler]] = []  # (the root's own, ours)
        self._raised: list[tuple[logging.Handler, int]] = []  # Ray's console handler, its level
        self._captured_warnings = False
        self._transformers_propagated = False
        self._route_driver()

    # ---- the driver's records ----------------------------------------------------------------

    def _route_driver(self) -> None:
        root, ray_logger = logging.getLogger(), logging.getLogger("ray")  # Ray's does not propagate
        for logger in (root, ray_logger):
            logger.addHandler(self._driver_log)
        for handler in list(root.handlers):
            if type(handler) is logging.StreamHandler and handler.stream in (sys.stdout, sys.stderr):
                ours = _AboveTheBar(handler.stream)
                ours.setFormatter(handler.formatter)
                ours.setLevel(handler.level)
                if not self.verbose:
                    ours.addFilter(_ConsoleRecords())
                root.removeHandler(handler)
                root.addHandler(ours)
                self._swapped.append((handler, ours))
        if self.verbose:
            return
        for handler in ray_logger.handlers:
            if handler is not self._driver_log and isinstance(handler, logging.StreamHandler):
                self._raised.append((handler, handler.level))
                handler.setLevel(max(handler.level, logging.ERROR))
        if warnings.showwarning.__module__ != "logging":  # unless someone captures them already
            logging.captureWarnings(True)  # as records: to driver.log, and to the console if ours
            self._captured_warnings = True
        self._transformers_propagated = _transformers_logging(to_root=True)

    # ---- the role processes' lines -------------------------------------------------------------

    def follow_workers(self) -> bool:
        """Take over Ray's printer of the workers' forwarded lines; False when Ray forwards none
        to this driver (``log_to_driver=False``)."""
        dispatcher = _dispatcher()
        printer = dict(dispatcher.handlers).get(RAY_PRINTER)
        if printer is None:
            return False
        self._ray_printer = printer
        dispatcher.remove_handler(RAY_PRINTER)
        dispatcher.add_handler(ROUTER, self._route)
        return True

    def _route(self, data: dict[str, Any]) -> None:
        """One batch of lines of one process (Ray's log monitor batches them per file)."""
        try:
            source = str(data.get("pid"))
            if source != "autoscaler":  # its status dumps stay in Ray's monitor.log
                self._write(data)
            if self.verbose or source in ("autoscaler", "raylet"):
                self._ray_printer(data)  # the autoscaler's printer shows its events only
                return
            kept = [line for line in data.get("lines", []) if shown_on_console(line)]
            if kept:
                self._ray_printer({**data, "lines": kept})
        except Exception:  # noqa: BLE001 - Ray's log thread must survive whatever happens here
            self._ray_printer(data)

    def _write(self, data: dict[str, Any]) -> None:
        lines = data.get("lines") or []
        if not lines:
            return
        name = data.get("actor_name") or data.get("task_name") or "worker"
        key = f"{name}-{data.get('pid') or 'unknown'}"
        if data.get("ip") and data.get("ip") != data.get("localhost"):
            key += f"-{data['ip']}"  # pids repeat across nodes
        key = re.sub(r"[^\w.-]", "_", key)
        with self._lock:
            if key not in self._files:
                self._files[key] = open(self.logs_dir / f"{key}.log", "a", buffering=1)
            self._files[key].write("".join(f"{line}\n" for line in lines))

    # ---- the end ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Everything as before: Ray's printer back (while Ray still runs), the driver's handlers
        and levels restored, the files closed."""
        if self._ray_printer is not None:
            import ray

            dispatcher = _dispatcher()
            dispatcher.remove_handler(ROUTER)
            if ray.is_initialized():  # ray.shutdown removed Ray's printer itself; a later init adds it
                dispatcher.add_handler(RAY_PRINTER, self._ray_printer)
            self._ray_printer = None
        root = logging.getLogger()
        for theirs, ours in self._swapped:
            root.removeHandler(ours)
            root.addHandler(theirs)
        for handler, level in self._raised:
            handler.setLevel(level)
        if self._captured_warnings:
            logging.captureWarnings(False)
        if self._transformers_propagated:
            _transformers_logging(to_root=False)
        for logger in (root, logging.getLogger("ray")):
            logger.removeHandler(self._driver_log)
        self._driver_log.close()
        self._swapped, self._raised = [], []
        self._captured_warnings = self._transformers_propagated = False
        with self._lock:
            for file in self._files.values():
                file.close()
            self._files.clear()


def _dispatcher() -> Any:
    # Ray 2.60's hook for the worker lines it forwards to the driver: its printer is one handler
    # of this dispatcher (ray/_private/worker.py, connect()). Private API, hence pinned Ray.
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    return global_worker_stdstream_dispatcher


def _transformers_logging(to_root: bool) -> bool:
    """transformers' records through the root logger (``to_root``), or through its own console
    handler again, as it sets itself up (its logger does not propagate); False without it."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return False
    if to_root:
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
    else:
        hf_logging.disable_propagation()
        hf_logging.enable_default_handler()
    return True
