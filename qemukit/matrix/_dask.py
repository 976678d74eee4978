"""The Dask runner: each job a task holding the worker resource ``vm=1``.

The client ships each job's files once, under their hash (see
:mod:`qemukit.matrix._shipping`), submits the tasks, follows which worker
began each (a worker event per start, so a lost worker's jobs are counted
as retries) and, when the run is stopped early, cancels the queued tasks and
runs :func:`~qemukit.matrix._run.stop_matrix_here` on every worker.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import socket
import tarfile
import tempfile
import threading
import uuid
from collections.abc import Callable, Generator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import SpecError
from ..results import Outcome
from . import _slots
from ._file import Job
from ._run import (
    Attempt,
    JobResult,
    MatrixProgress,
    Tracker,
    end_standbys_here,
    run_attempt,
    stop_matrix_here,
)
from ._shipping import KERNEL_DIR, bundled_image, files_to_ship, materialize, read_for_shipping

__all__ = ["dask_security", "run_dask", "run_job_on_worker"]

EVENT_TOPIC = "qemukit-matrix"

log = logging.getLogger(__name__)


def run_job_on_worker(job: Job, files: Mapping[str, tuple[str, str, bytes]], matrix: str,
                      key: str) -> Attempt:
    """The Dask task: put the shipped files in place, run the job, say where it ran."""
    worker: Any = importlib.import_module("distributed").get_worker()
    name = str(worker.name)
    worker.log_event(EVENT_TOPIC, {"matrix": matrix, "job": job.name, "key": key, "worker_name": name,
                                    "host": socket.gethostname()})
    try:
        paths = {key: materialize(key, digest, base, data)
                 for key, (digest, base, data) in files.items()}
        if paths.get("kernel", "").endswith(KERNEL_DIR):  # the image with its .config
            paths["kernel"] = str(bundled_image(Path(paths["kernel"])))
    except (OSError, ValueError, tarfile.TarError) as exc:  # ValueError: bytes not of their digest
        return Attempt(None, f"cannot store the job's files on worker {name}: {exc}",
                        socket.gethostname(), name)
    # The worker's standby clone counts in its vm resource, with every matrix's jobs here.
    cap = int(worker.state.total_resources.get("vm", 1))
    _slots.register(matrix, _slots.worker_slots(max(1, cap)))
    return run_attempt(job.with_files(paths), matrix, name)


def run_dask(jobs: Sequence[Job], scheduler: str, retries: int, fail_fast: bool,
             progress: Callable[[MatrixProgress], None] | None, security: Any
             ) -> Generator[JobResult, None, None]:
    """Run ``jobs`` on the workers of ``scheduler``, yielding results as they end."""
    try:
        # Typed as Any: distributed ships no complete annotations.
        distributed: Any = importlib.import_module("distributed")
    except ImportError as exc:
        raise SpecError("scheduler", scheduler, "needs Dask distributed: "
                        "pip install 'qemukit[dask]'") from exc
    # Read every file before connecting: a missing kernel is an error before anything runs.
    contents: dict[str, bytes] = {}
    shipped: dict[str, dict[str, tuple[str, str]]] = {}
    installed: dict[Path, Path] = {}
    with tempfile.TemporaryDirectory(prefix="qemukit-matrix-") as workdir:
        for job in jobs:
            refs = {}
            for key, path in files_to_ship(job, Path(workdir), installed).items():
                data = read_for_shipping(key, path)
                digest = hashlib.sha256(data).hexdigest()
                contents.setdefault(digest, data)
                refs[key] = (digest, path.name or key)
            shipped[job.name] = refs
    try:
        client = distributed.Client(scheduler, timeout=30, security=security)
    except OSError as exc:
        raise SpecError("scheduler", scheduler, f"cannot reach the Dask scheduler: {exc}") from exc
    matrix = uuid.uuid4().hex
    tracker = Tracker(len(jobs), retries, progress, None)
    pending: dict[Any, Job] = {}
    starts: dict[str, list[dict[str, Any]]] = {}  # task key -> the workers that began it
    starts_lock = threading.Lock()

    def started(event: tuple[float, Any]) -> None:  # on the client's event loop thread
        msg = event[1]
        if isinstance(msg, dict) and msg.get("matrix") == matrix:
            with starts_lock:
                starts.setdefault(str(msg.get("key")), []).append(msg)

    finished_ok = False
    try:
        client.subscribe_topic(EVENT_TOPIC, started)
        # Each file once into the cluster, named by its hash; tasks get it as an argument.
        scattered = {digest: client.scatter(data, hash=False) for digest, data in contents.items()}
        queue = distributed.as_completed()

        def submit(job: Job) -> None:
            tracker.submitted(job)
            files = {key: (digest, base, scattered[digest])
                     for key, (digest, base) in shipped[job.name].items()}
            key = f"qemukit-{job.name}-{uuid.uuid4().hex[:8]}"
            future = client.submit(run_job_on_worker, job, files, matrix, key, key=key,
                                   resources={"vm": 1}, pure=False)
            pending[future] = job
            queue.add(future)

        for job in jobs:
            submit(job)
        tracker.report()
        for future in queue:
            job = pending.pop(future)
            try:
                attempt = future.result()
                ran = 1
            except Exception as exc:  # KilledWorker, a lost connection: the cluster's fault
                attempt = Attempt(None, f"the task failed on the cluster: {exc!r}", "?", "?")
                ran = 0
            with starts_lock:
                began = starts.pop(str(future.key), [])
            # Each start but the one that gave the result: Dask lost that worker and ran it again.
            lost = began[:len(began) - ran] if len(began) > ran else []
            outcome = tracker.finish(job, attempt,
                                     [f"worker {e.get('worker_name')} on {e.get('host')} was lost"
                                      for e in lost], extra_attempts=max(0, len(lost) - 1 + ran))
            if outcome is None:
                submit(job)
                continue
            tracker.report()
            yield outcome
            if fail_fast and outcome.outcome is not Outcome.PASSED:
                return
        finished_ok = True
    finally:
        if pending or not finished_ok:
            client.cancel(list(pending), force=True)
            try:
                client.run(stop_matrix_here, matrix)
            except Exception as exc:  # a worker that is gone took its VMs with it anyway
                log.warning("matrix %s: stopping the VMs on the workers failed: %r", matrix, exc)
        try:  # the standby clones the last jobs left end with the matrix
            client.run(end_standbys_here, matrix)
        except Exception as exc:  # a worker that is gone took its standbys with it
            log.warning("matrix %s: ending the standby clones on the workers failed: %r",
                        matrix, exc)
        with contextlib.suppress(Exception):
            client.unsubscribe_topic(EVENT_TOPIC)
        client.close()



def dask_security(scheduler: str, *, ca_file: str | os.PathLike[str] | None = None,
                  cert: str | os.PathLike[str] | None = None,
                  key: str | os.PathLike[str] | None = None) -> Any:
    """The ``distributed.security.Security`` to reach ``scheduler`` with, or None for ``tcp://``.

    For ``tls://``: the CA file, client certificate and key given here, each
    falling back to Dask's configuration (``distributed.comm.tls.ca-file``,
    ``distributed.comm.tls.client.cert``, ``.key``; ``DASK_DISTRIBUTED__COMM__TLS__...``
    in the environment); a CA and a certificate are required (the key may be in
    the certificate's file), and encryption is required of every connection.
    Raises :class:`SpecError` naming the option for a missing file, for TLS
    options with a ``tcp://`` scheduler, or for ``tls://`` without a CA or
    certificate.
    """
    given = {"tls_ca_file": ca_file, "tls_cert": cert, "tls_key": key}
    if not scheduler.startswith("tls://"):
        for field, value in given.items():
            if value is not None:
                raise SpecError(field, str(value), f"is for a tls:// scheduler, not {scheduler}")
        return None
    try:
        distributed: Any = importlib.import_module("distributed")
        config: Any = importlib.import_module("dask.config")
    except ImportError as exc:
        raise SpecError("scheduler", scheduler, "needs Dask distributed: "
                        "pip install 'qemukit[dask]'") from exc
    configured = {"tls_ca_file": config.get("distributed.comm.tls.ca-file", None),
                  "tls_cert": config.get("distributed.comm.tls.client.cert", None),
                  "tls_key": config.get("distributed.comm.tls.client.key", None)}
    chosen = {field: os.fspath(value) if value is not None else configured[field]
              for field, value in given.items()}
    for field, path in chosen.items():
        if path is not None and not os.path.isfile(path):
            raise SpecError(field, path, "no such file")
    for field, what in (("tls_ca_file", "the CA that signed the scheduler's certificate"),
                        ("tls_cert", "this client's certificate")):
        if chosen[field] is None:
            raise SpecError(field, None, f"a tls:// scheduler needs {what}: "
                            f"--{field.replace('_', '-')} or distributed.comm.tls in Dask's "
                            "configuration")
    return distributed.security.Security(
        tls_ca_file=chosen["tls_ca_file"], tls_client_cert=chosen["tls_cert"],
        tls_client_key=chosen["tls_key"], require_encryption=True)

