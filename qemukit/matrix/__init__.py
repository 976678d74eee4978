"""Test matrices: many jobs, each a VM plus a command, on one machine or a Dask cluster.

A :class:`Job` is what :func:`~qemukit.kernel.run_in_vm` needs (a VM
description, a command, a timeout) plus a name and the axes it was made from.
:func:`load_matrix` reads them from a TOML file::

    [defaults]                 # optional: keys every job starts from
    image = "tiny"
    accel = "tcg"
    timeout = 120

    [matrix.kernels]           # optional product: one axis per table, in file order
    stock = {}
    quiet = { append = "console=ttyS0 panic=-1 quiet" }

    [matrix.commands]          # a non-table value is the axis' own key (see AXIS_KEYS)
    ok = ["true"]
    fails = ["false"]

    [[job]]                    # and/or single jobs
    name = "uname"
    command = ["uname", "-r"]

A job's keys are ``name``, ``command`` (an argv list), ``timeout``, ``image``
(as ``--image``), ``modules`` (as ``run --modules``), ``continue_on_oops``,
``axes`` (a table of names, for reports) and every key a ``-f vm.toml`` file
accepts but ``name`` (the VM's name is picked per run). Later layers win:
defaults, then each axis value in order, then the ``[[job]]`` table. A product
job is named by its axis values joined with ``/`` (``quiet/fails``). Every
mistake is a :class:`~qemukit.errors.SpecError` naming the key and the value,
raised before any VM starts.

:func:`run_matrix` runs the jobs and yields a :class:`JobResult` as each one
finishes. Without a scheduler it uses a local pool of threads, never more VMs
at once than :func:`default_parallelism` (cores, and available memory over
the largest job's memory) or ``jobs_at_once``. With ``scheduler`` (a Dask
scheduler address, ``tcp://HOST:PORT``; needs ``qemukit[dask]``) each job is
a Dask task holding the worker resource ``vm=1``, so a worker runs as many
VMs at once as its ``--resources vm=N`` says.

A Dask scheduler runs whatever code its clients send, on every worker, as the
worker's user: a plain ``tcp://`` scheduler does that for anyone who can reach
its port. ``tls://HOST:PORT`` with a :func:`dask_security` (a CA file, and the
client's certificate and key, from arguments or from Dask's configuration
``distributed.comm.tls.*``) makes the scheduler and workers accept only peers
whose certificate that CA signed, and encrypts what is sent (job files too).

Failures: a job that ran and failed, panicked, oopsed or timed out is a
result and never run again. An infrastructure failure is retried, up to
``retries`` more attempts: the VM never started (QEMU could not start, the
host was out of memory, a LaunchError), the runner itself raised, or the
Dask worker running it was lost. A result says how many attempts it took and
why the earlier ones were retried.

Files on a cluster: the local files a job names (``kernel``, ``initrd``, the
``modules`` directory, as a tar archive) are read once on the client, put into
the cluster with ``Client.scatter`` under their SHA-256 and handed to the task
as arguments; the worker writes each to ``<cache>/matrix-files/<sha256>/<name>``
once (beside it, then renamed into place, so concurrent tasks and workers
sharing a cache agree; the same bytes under another name are one more name
there) and later tasks find it there. A kernel build tree is not shipped whole: the client checks it (its
config against the job, as a local run does), installs its modules once per
tree (``make modules_install`` into a temporary directory) and ships its built
image and those modules (the job's own ``modules`` win, as they do locally).
Built-in images are built on the worker on first need, under a file
lock in its cache directory so many tasks asking at once build it once.
Each VM is started from the worker process, so a worker that dies takes its
QEMUs with it (the parent-death signal) and Dask runs its jobs elsewhere.

The package's modules: :mod:`~qemukit.matrix._file` (jobs and the TOML format),
:mod:`~qemukit.matrix._run` (one attempt of a job, its result, stopping a
matrix's VMs), :mod:`~qemukit.matrix._local` (the local pool),
:mod:`~qemukit.matrix._dask` and :mod:`~qemukit.matrix._shipping` (the Dask
runner and the files it ships), :mod:`~qemukit.matrix._report` (the report).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Generator, Iterable
from pathlib import Path
from typing import Any

from ..errors import SpecError
from ._dask import dask_security, run_dask
from ._file import AXIS_KEYS, JOB_KEYS, Job, check_unique, load_matrix, parse_matrix
from ._local import default_parallelism, run_local
from ._report import summary, write_jsonl, write_junit
from ._run import JobResult, MatrixProgress

__all__ = [
    "AXIS_KEYS", "JOB_KEYS", "Job", "JobResult", "MatrixProgress", "dask_security",
    "default_parallelism", "load_matrix", "parse_matrix", "run_matrix", "summary", "write_jsonl",
    "write_junit",
]

log = logging.getLogger(__name__)


def _nothing() -> Generator[JobResult, None, None]:
    yield from ()


def run_matrix(
    jobs: Iterable[Job],
    *,
    jobs_at_once: int | None = None,
    scheduler: str | None = None,
    security: Any = None,
    retries: int = 2,
    fail_fast: bool = False,
    progress: Callable[[MatrixProgress], None] | None = None,
    crash_dir: str | Path | None = None,
) -> Generator[JobResult, None, None]:
    """Run ``jobs``, yielding each :class:`JobResult` as it finishes (not in job order).

    Local pool unless ``scheduler`` (a Dask address, ``tcp://HOST:PORT`` or
    ``tls://HOST:PORT``); ``security`` is Dask's ``Security`` for it (default:
    :func:`dask_security` of the scheduler, Dask's own TLS configuration).
    ``jobs_at_once`` bounds the local pool (default :func:`default_parallelism`);
    on Dask the workers' ``vm`` resources bound it. ``retries`` more attempts
    for infrastructure failures; ``fail_fast`` stops at the first job that did
    not pass. Stopping the iteration early (``close()``, Ctrl-C, an exception
    in the consumer) stops every VM the matrix started, on every worker, those
    still starting (a warm state being built) included.
    ``crash_dir`` is every job's that names none (a panic or oops writes a crash
    bundle under it, on the host that ran the job; see :mod:`qemukit.crashdir`).
    """
    job_list = list(jobs)
    if crash_dir is not None:
        job_list = [job if job.crash_dir is not None
                    else dataclasses.replace(job, crash_dir=str(crash_dir)) for job in job_list]
    check_unique(job_list)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise SpecError("retries", retries, "must be an integer >= 0")
    if jobs_at_once is not None and (isinstance(jobs_at_once, bool)
                                     or not isinstance(jobs_at_once, int) or jobs_at_once < 1):
        raise SpecError("jobs", jobs_at_once, "must be an integer >= 1")
    if scheduler is not None:
        if not isinstance(scheduler, str) or not scheduler.startswith(("tcp://", "tls://")):
            raise SpecError("scheduler", scheduler,
                            "expected a Dask address, tls://HOST:PORT or tcp://HOST:PORT")
        if security is None:
            security = dask_security(scheduler)
        if scheduler.startswith("tcp://"):
            log.warning("matrix: %s is plain TCP: anyone who reaches it runs code on its "
                        "workers; prefer tls:// with certificates", scheduler)
    if not job_list:
        return _nothing()
    if scheduler is not None:
        return run_dask(job_list, scheduler, retries, fail_fast, progress, security)
    return run_local(job_list, jobs_at_once or default_parallelism(job_list), retries,
                      fail_fast, progress)

