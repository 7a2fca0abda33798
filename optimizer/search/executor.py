"""Where trials run: a pool of local processes (default), or Ray tasks on a local or remote Ray cluster.

Both take a batch of trial requests and return their outcomes in request order, so the study sees the same
results in the same order whichever runs them (same seed, same trials). A trial that crashes its process (a
segfault in a library, SIGKILL, out of memory) comes back as a failed outcome; the search goes on.

Latency is measured one trial at a time per machine (``optimizer.measure.timing_lock``): a file lock in the
machine's temporary folder, which each machine of a Ray cluster has its own of; accuracy, training and exports
run in parallel. A Ray resource would serialize whole trials, since a trial measures inside its own run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from optimizer.errors import Interrupted, MissingDependency, RecipeError, one_line


class Executor(Protocol):
    description: str

    def run_batch(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


def _crashed(request: dict[str, Any], reason: str) -> dict[str, Any]:
    return {"number": request["number"], "phase": request.get("phase", "screening"), "out": request["out"],
            "status": "failed", "error": reason}


class LocalExecutor:
    """Each trial in a fresh process (``python -m optimizer.search.trial``), at most ``workers`` at once.

    The processes run in their own session: a Ctrl-C reaches the search, which passes one SIGINT on to each
    running trial (its Runner then cleans up its staging folder) and waits for them."""

    def __init__(self, workers: int, work_dir: Path):
        self.workers = workers
        self.work_dir = work_dir
        self.description = f"{workers} local process{'es' if workers > 1 else ''}"
        self._processes: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._stopping = False

    def _run_one(self, request: dict[str, Any]) -> dict[str, Any]:
        tag = f"{request.get('phase', 'screening')}-{request['number']:04d}"
        request_path = self.work_dir / f"{tag}.request.json"
        outcome_path = self.work_dir / f"{tag}.outcome.json"
        outcome_path.unlink(missing_ok=True)
        request_path.write_text(json.dumps(request, default=str), encoding="utf-8")
        log_path = self.work_dir / f"{tag}.log"
        with self._lock:
            if self._stopping:
                raise KeyboardInterrupt  # never started: it stays open in the study and runs on --resume
            with open(log_path, "wb") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "optimizer.search.trial", str(request_path), str(outcome_path)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                    env=_child_environment())
            self._processes[request["number"]] = process
        code = process.wait()
        with self._lock:
            self._processes.pop(request["number"], None)
        if outcome_path.is_file():
            return json.loads(outcome_path.read_text(encoding="utf-8"))
        if code == 130 or self._stopping:
            raise KeyboardInterrupt
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        return _crashed(request, f"the trial's process ended with {how} and no outcome (log: {log_path})"
                        + (f": {_last_line(log_path)}" if _last_line(log_path) else ""))

    def run_batch(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        pool = ThreadPoolExecutor(max_workers=self.workers)
        futures = [pool.submit(self._run_one, request) for request in requests]
        try:
            results = []
            for future in futures:
                try:
                    results.append(future.result())
                except KeyboardInterrupt:
                    raise Interrupted("interrupted") from None
            return results
        except (KeyboardInterrupt, Interrupted):
            self._interrupt()
            # Outcomes that did come back are kept: the driver tells the study about them.
            finished = [f.result() for f in futures if f.done() and f.exception() is None]
            raise BatchInterrupted(finished) from None
        finally:
            pool.shutdown(wait=True)

    def _interrupt(self) -> None:
        with self._lock:
            self._stopping = True
            running = list(self._processes.values())
        for process in running:
            try:
                os.killpg(process.pid, signal.SIGINT)
            except ProcessLookupError:  # the trial's process group has already exited: nothing to stop
                pass
        for process in running:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

    def close(self) -> None:
        with self._lock:
            running = list(self._processes.values())
        for process in running:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:  # the trial's process group has already exited: nothing to stop
                pass


class BatchInterrupted(Exception):
    """Ctrl-C during a batch; carries the outcomes that finished before it."""

    def __init__(self, finished: list[dict[str, Any]]):
        super().__init__("interrupted")
        self.finished = finished


def _child_environment() -> dict[str, str]:
    env = dict(os.environ)
    # The trial process imports this package from where the search imported it.
    import optimizer

    home = str(Path(optimizer.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([home] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return one_line(lines[-1])[:300] if lines else ""


class RayExecutor:
    """Trials as Ray tasks (one CPU each, no retries: a trial that fails is recorded, not re-run).

    ``address`` is given to ``ray.init`` ('auto', 'ray://head:10001', ...); ``local`` starts a Ray on this
    machine with ``num_cpus`` CPUs. The search folder must be on a file system every node sees at the same path
    (trial outputs and the shared stage cache live there)."""

    def __init__(self, address: str, workers: int, *, num_cpus: int = 2):
        try:
            import ray
        except ImportError:
            raise MissingDependency("--ray needs Ray: pip install 'optimizer[ray]'") from None
        self._ray = ray
        self.workers = workers
        import optimizer

        home = str(Path(optimizer.__file__).resolve().parent.parent)
        runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
            [home] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}}
        try:
            if address == "local":
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                         runtime_env=runtime_env, configure_logging=False)
                self.description = f"a local Ray with {num_cpus} CPUs"
            else:
                ray.init(address=address, log_to_driver=False, runtime_env=runtime_env, configure_logging=False)
                self.description = f"the Ray cluster at {address}"
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RecipeError(f"--ray {address}: cannot connect ({one_line(str(exc))[:200]}); give 'local', 'auto' "
                              "or the address of a running Ray head (ray://HOST:10001)") from None
        self._task = ray.remote(num_cpus=1, max_retries=0)(_ray_trial)

    def run_batch(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ray = self._ray
        results: list[dict[str, Any] | None] = [None] * len(requests)
        pending: dict[Any, int] = {}
        queue = list(enumerate(requests))
        try:
            while queue or pending:
                while queue and len(pending) < self.workers:
                    index, request = queue.pop(0)
                    pending[self._task.remote(request)] = index
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    index = pending.pop(ref)
                    try:
                        results[index] = ray.get(ref)
                    except Exception as exc:  # the task's worker died (SIGKILL, OOM): a failed trial
                        results[index] = _crashed(requests[index], f"the Ray task failed: "
                                                                   f"{one_line(str(exc)).split(' Traceback')[0][:300]}")
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise BatchInterrupted([r for r in results if r is not None]) from None
        return [r for r in results if r is not None]

    def close(self) -> None:
        self._ray.shutdown()


def _ray_trial(request: dict[str, Any]) -> dict[str, Any]:
    from optimizer.search.trial import run_trial

    return run_trial(request)


def make_executor(ray_address: str | None, workers: int, work_dir: Path) -> Executor:
    if ray_address:
        return RayExecutor(ray_address, workers)
    return LocalExecutor(workers, work_dir)
