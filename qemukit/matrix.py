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
as arguments; the worker writes each to ``<cache>/matrix-files/<sha256>/``
once (an atomic rename, so concurrent tasks agree) and later tasks find it
there. A kernel build tree is not shipped whole: the client checks it (its
config against the job, as a local run does), installs its modules once per
tree (``make modules_install`` into a temporary directory) and ships its built
image and those modules (the job's own ``modules`` win, as they do locally).
Built-in images are built on the worker on first need, under a file
lock in its cache directory so many tasks asking at once build it once.
Each VM is started from the worker process, so a worker that dies takes its
QEMUs with it (the parent-death signal) and Dask runs its jobs elsewhere.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import hashlib
import importlib
import io
import itertools
import json
import logging
import os
import shutil
import socket
import tarfile
import tempfile
import threading
import time
import traceback
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import images, kconfig
from ._fs import locked
from .errors import QemukitError, SpecError, StateError
from .host._tcg import tb_size_for
from .kernel import JUNIT_TEXT_LIMIT, KernelTestResult, json_safe, run_in_vm, xml_safe
from .paths import cache_dir
from .spec import VMSpec, load_toml, parse_size
from .vm import VM

__all__ = [
    "AXIS_KEYS", "JOB_KEYS", "Job", "JobResult", "MatrixProgress", "dask_security",
    "default_parallelism", "load_matrix", "parse_matrix", "run_matrix", "summary", "write_jsonl",
    "write_junit",
]

#: The keys of a job beyond the VM description's.
JOB_KEYS = ("name", "command", "timeout", "image", "modules", "continue_on_oops", "crash_dir",
            "axes")
#: A matrix axis whose values are not tables sets this key (``commands = {ok = ["true"]}``).
AXIS_KEYS = {"commands": "command", "kernels": "kernel", "images": "image", "appends": "append",
             "initrds": "initrd", "memories": "memory", "cpus": "cpus", "timeouts": "timeout"}
#: The VM description's keys a job accepts (the VM's own name is picked per run).
_SPEC_KEYS = tuple(f.name for f in dataclasses.fields(VMSpec) if f.name != "name")
#: The outcomes a summary counts, in this order.
_OUTCOMES = ("passed", "failed", "panic", "oops", "timeout", "error")
#: Memory a VM costs beyond its guest RAM (QEMU itself, TCG's code buffer), in MiB.
_VM_OVERHEAD_MIB = 128
#: How long stopping the running VMs (after Ctrl-C or --fail-fast) may take, per VM.
_STOP_TIMEOUT = 10.0
_EVENT_TOPIC = "qemukit-matrix"

log = logging.getLogger(__name__)


# -- jobs and the matrix file --------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One VM, one command, one verdict: what a matrix is made of.

    ``vm`` holds VM description keys (as in a ``-f vm.toml`` file); with
    ``image`` they override that image's spec, and a ``kernel`` without an
    ``initrd`` boots with the tiny initramfs, as ``run_kernel`` does.
    ``axes`` maps axis names to value names, for reports. ``crash_dir`` as for
    :func:`~qemukit.kernel.run_in_vm` (a path on the host that runs the job).
    """

    name: str
    command: tuple[str, ...]
    timeout: float = 300.0
    image: str | None = None
    vm: Mapping[str, Any] = field(default_factory=dict)
    modules: str | None = None
    continue_on_oops: bool = False
    axes: Mapping[str, str] = field(default_factory=dict)
    crash_dir: str | None = None

    def __post_init__(self) -> None:
        where = f"job {self.name!r}"
        if not isinstance(self.name, str) or not self.name.strip():
            raise SpecError("job.name", self.name, "must be a non-empty string")
        command: object = self.command
        if isinstance(command, list):
            command = tuple(command)
            object.__setattr__(self, "command", command)
        if (not isinstance(command, tuple) or not command
                or not all(isinstance(a, str) for a in command)):
            raise SpecError(f"{where}: command", self.command,
                            "must be a non-empty list of strings (an argv, no shell)")
        if (isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float))
                or not self.timeout > 0):
            raise SpecError(f"{where}: timeout", self.timeout, "must be a number of seconds > 0")
        object.__setattr__(self, "timeout", float(self.timeout))
        if self.image is not None and self.image not in images.NAMES:
            raise SpecError(f"{where}: image", self.image,
                            f"unknown image; choose from {', '.join(images.NAMES)}")
        if self.modules is not None and not isinstance(self.modules, str):
            raise SpecError(f"{where}: modules", self.modules, "must be a directory path")
        if self.crash_dir is not None and not isinstance(self.crash_dir, str):
            raise SpecError(f"{where}: crash_dir", self.crash_dir, "must be a directory path")
        if not isinstance(self.continue_on_oops, bool):
            raise SpecError(f"{where}: continue_on_oops", self.continue_on_oops,
                            "must be true or false")
        if not isinstance(self.axes, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.axes.items()):
            raise SpecError(f"{where}: axes", self.axes, "must be a table of names")
        if not isinstance(self.vm, Mapping):
            raise SpecError(f"{where}: vm", self.vm, "must be a table of VM description keys")
        object.__setattr__(self, "vm", dict(self.vm))
        object.__setattr__(self, "axes", dict(self.axes))
        unknown = sorted(set(self.vm) - set(_SPEC_KEYS))
        if unknown:
            raise SpecError(f"{where}: {unknown[0]}", self.vm[unknown[0]],
                            f"unknown key; a job takes {', '.join(JOB_KEYS)} and the VM keys "
                            f"{', '.join(_SPEC_KEYS)}")
        probe = dict(self.vm)
        if self.image is not None and "kernel" not in probe:
            probe["kernel"] = "image-kernel"  # the image brings one; append/initrd need it
        try:
            VMSpec.from_dict(probe)  # pure: types and ranges, no file is opened
        except SpecError as exc:
            raise SpecError(f"{where}: {exc.field}", exc.value, exc.reason) from exc
        except TypeError as exc:
            raise SpecError(f"{where}: vm", self.vm, str(exc)) from exc

    @property
    def memory_mib(self) -> int:
        """The guest memory this job's VM asks for, in MiB (the image's default if unset)."""
        value = self.vm.get("memory")
        if value is None:
            return 1024 if self.image == "debian" else 512
        return parse_size(value, "memory")

    def needs_image(self) -> str | None:
        """The built-in image this job boots (tiny for a bare ``kernel``), or None."""
        if self.image is not None:
            return self.image
        if "kernel" in self.vm and "initrd" not in self.vm:
            return "tiny"
        return None

    def spec(self) -> VMSpec:
        """The VM description to boot (needs the image built, see :meth:`needs_image`).

        A job on a built-in image starts warm unless it says ``warm = false`` (as
        ``qemukit run --image`` does): the first job of a VM description boots and
        saves its ready state, the others on that host restore it. A spec that
        cannot start warm (see :func:`qemukit.warm.warm_refusal`) boots cold.
        """
        fields = dict(self.vm)
        image = self.needs_image()
        if image is not None:
            fields.setdefault("warm", True)
            return images.spec(image, **fields)
        return VMSpec.from_dict(fields)

    def files(self) -> dict[str, Path]:
        """The local files this job names, by key: ``kernel``, ``initrd``, ``modules``."""
        out = {key: Path(self.vm[key]) for key in ("kernel", "initrd") if self.vm.get(key)}
        if self.modules is not None:
            out["modules"] = Path(self.modules)
        return out

    def with_files(self, paths: Mapping[str, str]) -> Job:
        """This job with the named files at other paths (where a worker keeps them)."""
        vm = dict(self.vm)
        modules = self.modules
        for key, path in paths.items():
            if key == "modules":
                modules = path
            else:
                vm[key] = path
        return dataclasses.replace(self, vm=vm, modules=modules)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for JSON)."""
        return {"name": self.name, "axes": dict(self.axes), "command": list(self.command),
                "timeout": self.timeout, "image": self.image, "vm": dict(self.vm),
                "modules": self.modules, "continue_on_oops": self.continue_on_oops,
                "crash_dir": self.crash_dir}


def _job_from_table(name: Any, table: Mapping[str, Any], axes: Mapping[str, str],
                    where: str) -> Job:
    unknown = sorted(set(table) - set(JOB_KEYS) - set(_SPEC_KEYS))
    if unknown:
        raise SpecError(f"{where}.{unknown[0]}", table[unknown[0]],
                        f"unknown key; a job takes {', '.join(JOB_KEYS)} and the VM keys "
                        f"{', '.join(_SPEC_KEYS)}")
    if "command" not in table:
        raise SpecError(f"{where}.command", None, "every job needs a command (an argv list)")
    extra_axes = table.get("axes", {})
    if not isinstance(extra_axes, Mapping):
        raise SpecError(f"{where}.axes", extra_axes, "must be a table of names")
    kwargs: dict[str, Any] = {k: table[k] for k in JOB_KEYS if k in table and k not in
                              ("name", "axes")}
    return Job(name=name, axes={**axes, **extra_axes},
               vm={k: v for k, v in table.items() if k in _SPEC_KEYS}, **kwargs)


def _axis_values(axis: str, values: Any) -> list[tuple[str, dict[str, Any]]]:
    """An axis' (value name, keys) pairs, from a table or a list of tables with ``name``."""
    where = f"matrix.{axis}"
    pairs: list[tuple[str, Any]]
    if isinstance(values, Mapping):
        pairs = list(values.items())
    elif isinstance(values, list):
        pairs = []
        for index, item in enumerate(values):
            if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
                raise SpecError(f"{where}[{index}]", item,
                                "each entry of a list axis must be a table with a name")
            pairs.append((item["name"], {k: v for k, v in item.items() if k != "name"}))
    else:
        raise SpecError(where, values, "an axis is a table of named values (or a list of "
                        "tables with a name)")
    if not pairs:
        raise SpecError(where, values, "an axis needs at least one value")
    out = []
    seen: set[str] = set()
    for value_name, keys in pairs:
        if value_name in seen:
            raise SpecError(f"{where}.{value_name}", value_name, "this value name is used twice")
        seen.add(value_name)
        if not isinstance(keys, Mapping):
            if axis not in AXIS_KEYS:
                raise SpecError(f"{where}.{value_name}", keys,
                                f"must be a table of job keys (only the axes "
                                f"{', '.join(AXIS_KEYS)} take a bare value)")
            keys = {AXIS_KEYS[axis]: keys}
        for key in ("name", "axes"):
            if key in keys:
                raise SpecError(f"{where}.{value_name}.{key}", keys[key],
                                "an axis value cannot set this (the job is named by its axes)")
        out.append((value_name, dict(keys)))
    return out


def parse_matrix(data: Mapping[str, Any], source: str = "matrix") -> list[Job]:
    """The jobs a parsed matrix file describes (see the module docstring for the format)."""
    unknown = sorted(set(data) - {"defaults", "matrix", "job"})
    if unknown:
        raise SpecError(unknown[0], data[unknown[0]],
                        f"unknown table in {source}; expected defaults, matrix, job")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, Mapping):
        raise SpecError("defaults", defaults, "must be a table")
    for key in ("name", "axes"):
        if key in defaults:
            raise SpecError(f"defaults.{key}", defaults[key], "a default cannot set this")
    jobs: list[Job] = []
    product = data.get("matrix", {})
    if not isinstance(product, Mapping):
        raise SpecError("matrix", product, "must be a table of axes")
    if product:
        axes = [(axis, _axis_values(axis, values)) for axis, values in product.items()]
        for combo in itertools.product(*(values for _, values in axes)):
            table: dict[str, Any] = dict(defaults)
            names: dict[str, str] = {}
            for (axis, _), (value_name, keys) in zip(axes, combo, strict=True):
                table.update(keys)
                names[axis] = value_name
            where = "matrix[" + ", ".join(f"{a}={v}" for a, v in names.items()) + "]"
            jobs.append(_job_from_table("/".join(names.values()), table, names, where))
    singles = data.get("job", [])
    if not isinstance(singles, list):
        raise SpecError("job", singles, "write single jobs as [[job]] tables")
    for index, table in enumerate(singles):
        if not isinstance(table, Mapping):
            raise SpecError(f"job[{index}]", table, "must be a table")
        if not isinstance(table.get("name"), str):
            raise SpecError(f"job[{index}].name", table.get("name"), "every [[job]] needs a name")
        jobs.append(_job_from_table(table["name"], {**defaults, **table}, {}, f"job[{index}]"))
    if not jobs:
        raise SpecError("job", [], f"{source} describes no jobs (no [[job]] and no [matrix])")
    _check_unique(jobs)
    return jobs


def _check_unique(jobs: Sequence[Job]) -> None:
    seen: set[str] = set()
    for job in jobs:
        if job.name in seen:
            raise SpecError("job.name", job.name, "two jobs have this name")
        seen.add(job.name)


def load_matrix(path: str | Path) -> list[Job]:
    """Read a matrix file (TOML); errors name the key and value, and the file."""
    return parse_matrix(load_toml(path), source=str(path))


# -- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobResult:
    """One job's verdict: the run's result, where it ran, and how many attempts it took.

    ``retried`` says why each earlier attempt did not count (an infrastructure
    failure: QEMU did not start, the worker was lost, ...).
    """

    job: Job
    result: KernelTestResult
    host: str
    worker: str
    attempts: int = 1
    retried: tuple[str, ...] = ()

    @property
    def outcome(self) -> str:
        """The run's outcome: passed, failed, panic, oops, timeout or error."""
        return self.result.outcome

    def to_dict(self) -> dict[str, Any]:
        """Plain data: the job's name and axes, where it ran, and the run's result."""
        return {"name": self.job.name, "axes": dict(self.job.axes), "outcome": self.outcome,
                "host": self.host, "worker": self.worker, "attempts": self.attempts,
                "retried": list(self.retried), "job": self.job.to_dict(),
                "result": self.result.to_dict()}


@dataclass(frozen=True)
class MatrixProgress:
    """Where a matrix run stands; handed to ``run_matrix``'s ``progress`` callback."""

    total: int
    done: int
    failed: int
    running: int
    elapsed: float

    @property
    def eta(self) -> float | None:
        """Seconds left at the pace so far (None before the first job is done)."""
        if not self.done:
            return None
        return self.elapsed / self.done * (self.total - self.done)


@dataclass(frozen=True)
class _Attempt:
    """What one try of a job gave: a result, or an infrastructure failure (``infra``)."""

    result: KernelTestResult | None
    infra: str | None
    host: str
    worker: str


def _error_result(job: Job, message: str, duration: float = 0.0) -> KernelTestResult:
    return KernelTestResult(command=job.command, outcome="error", exit_status=None, stdout="",
                            stderr="", boot_time=None, duration=round(duration, 3), panic=None,
                            error=message, accel=None, console_log=None, console_tail="")


# -- running one job (here or on a worker) -------------------------------------------------


class _Cancelled(Exception):  # noqa: N818 - not an error: the matrix was stopped
    """Raised from ``on_started`` when the matrix was stopped while the VM started."""


class _Registry:
    """The VMs each matrix has running in this process, so a stop can end them all."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: dict[str, set[VM]] = {}
        self.stopped: set[str] = set()

    def started(self, matrix: str, vm: VM) -> None:
        with self.lock:
            if matrix in self.stopped:
                raise _Cancelled(matrix)
            self.running.setdefault(matrix, set()).add(vm)

    def finished(self, matrix: str, vm: VM | None) -> None:
        with self.lock:
            if vm is not None:
                self.running.get(matrix, set()).discard(vm)

    def is_stopped(self, matrix: str) -> bool:
        with self.lock:
            return matrix in self.stopped

    def stop(self, matrix: str) -> int:
        """Refuse new VMs for ``matrix`` and SIGKILL the running ones; how many were killed."""
        with self.lock:
            self.stopped.add(matrix)
            vms = list(self.running.pop(matrix, ()))
        killed = 0
        for vm in vms:
            try:
                vm.kill(kill_timeout=_STOP_TIMEOUT)
                killed += 1
            except StateError:
                pass  # it was already stopping: its own run finishes the cleanup
        return killed


_REGISTRY = _Registry()


def stop_matrix_here(matrix: str) -> int:
    """Stop matrix ``matrix``'s VMs in this process (what a Ctrl-C runs on each worker)."""
    return _REGISTRY.stop(matrix)


def _ensure_image(name: str, arch: str = "x86_64") -> None:
    """Build image ``name`` for ``arch`` unless it is cached; one builder at a time per cache."""
    if images.find_image(name, arch) is not None:
        return
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / f".matrix-build-{name}-{arch}.lock"):  # threads and processes alike
        images.build(name, arch=arch)  # the second comer finds it built and returns


def _run_attempt(job: Job, matrix: str, worker: str) -> _Attempt:
    """Run ``job`` once in this process; classify what went wrong."""
    host = socket.gethostname()
    start = time.monotonic()
    if _REGISTRY.is_stopped(matrix):
        return _Attempt(None, "the matrix was stopped", host, worker)
    started: list[VM] = []

    def on_started(vm: VM) -> None:
        started.append(vm)
        _REGISTRY.started(matrix, vm)

    try:
        image = job.needs_image()
        if image is not None:
            _ensure_image(image, str(job.vm.get("arch", "x86_64")))
        spec = job.spec()
    except QemukitError as exc:  # a bad job: its result, not worth a retry
        return _Attempt(_error_result(job, str(exc), time.monotonic() - start), None, host, worker)
    try:
        result = run_in_vm(spec, job.command, timeout=job.timeout, modules=job.modules,
                           on_started=on_started, continue_on_oops=job.continue_on_oops,
                           crash_dir=job.crash_dir)
    except _Cancelled:
        return _Attempt(None, "the matrix was stopped", host, worker)
    except QemukitError as exc:
        return _Attempt(_error_result(job, str(exc), time.monotonic() - start), None, host, worker)
    except Exception as exc:  # the runner itself broke: worth another try
        text = "".join(traceback.format_exception_only(exc)).strip()
        return _Attempt(None, f"the run raised {text}", host, worker)
    finally:
        _REGISTRY.finished(matrix, started[0] if started else None)
    if result.outcome == "error" and not started:
        # The VM never started (LaunchError, out of memory, no QEMU): the machine's fault.
        return _Attempt(result, f"QEMU did not start on {host}: {result.error}", host, worker)
    if _REGISTRY.is_stopped(matrix):
        return _Attempt(None, "the matrix was stopped", host, worker)
    return _Attempt(result, None, host, worker)


# -- the local pool ------------------------------------------------------------------------


def default_parallelism(jobs: Sequence[Job]) -> int:
    """VMs this machine can run at once: its CPUs, and available memory over the largest VM."""
    import psutil

    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    per_vm = max((j.memory_mib for j in jobs), default=512) + _VM_OVERHEAD_MIB
    by_memory = psutil.virtual_memory().available // (per_vm * 1024 * 1024)
    return max(1, min(cpus, by_memory, len(jobs) or 1))


class _Tracker:
    """Attempts, retry reasons and progress for one matrix run."""

    def __init__(self, total: int, retries: int,
                 progress: Callable[[MatrixProgress], None] | None, slots: int | None) -> None:
        self.total, self.retries, self.progress, self.slots = total, retries, progress, slots
        self.attempts: dict[str, int] = {}
        self.retried: dict[str, list[str]] = {}
        self.done = self.failed = self.running = 0
        self.begin = time.monotonic()

    def submitted(self, job: Job) -> None:
        self.attempts[job.name] = self.attempts.get(job.name, 0) + 1
        self.running += 1

    def report(self) -> None:
        if self.progress is not None:
            running = self.running if self.slots is None else min(self.running, self.slots)
            self.progress(MatrixProgress(self.total, self.done, self.failed, running,
                                         time.monotonic() - self.begin))

    def finish(self, job: Job, attempt: _Attempt, extra_retried: Sequence[str] = (),
               extra_attempts: int = 0) -> JobResult | None:
        """The job's result, or None when it should be tried again."""
        self.running -= 1
        reasons = self.retried.setdefault(job.name, [])
        reasons.extend(extra_retried)
        self.attempts[job.name] += extra_attempts
        if attempt.infra is not None:
            if self.attempts[job.name] <= self.retries:
                reasons.append(attempt.infra)
                return None
            result = attempt.result or _error_result(job, attempt.infra)
            if attempt.result is not None:
                result = dataclasses.replace(result, error=attempt.infra)
        else:
            assert attempt.result is not None
            result = attempt.result
        self.done += 1
        self.failed += result.outcome != "passed"
        return JobResult(job, result, attempt.host, attempt.worker, self.attempts[job.name],
                         tuple(reasons))


def _run_local(jobs: Sequence[Job], jobs_at_once: int, retries: int, fail_fast: bool,
               progress: Callable[[MatrixProgress], None] | None
               ) -> Generator[JobResult, None, None]:
    matrix = uuid.uuid4().hex
    tb_size = tb_size_for(jobs_at_once)
    if tb_size is not None:  # several TCG VMs at once: each a bounded code buffer (host/_tcg.py)
        jobs = [job if "tb_size" in job.vm else dataclasses.replace(job, vm={**job.vm, "tb_size": tb_size})
                for job in jobs]
    tracker = _Tracker(len(jobs), retries, progress, jobs_at_once)
    pool = cf.ThreadPoolExecutor(max_workers=jobs_at_once, thread_name_prefix="qemukit-matrix")
    pending: dict[cf.Future[_Attempt], Job] = {}
    stopped = False

    def submit(job: Job) -> None:
        tracker.submitted(job)
        pending[pool.submit(_run_attempt, job, matrix, "local")] = job

    try:
        for job in jobs:
            submit(job)
        tracker.report()
        while pending:
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for future in done:
                job = pending.pop(future)
                outcome = tracker.finish(job, future.result())
                if outcome is None:
                    submit(job)
                    continue
                tracker.report()
                yield outcome
                if fail_fast and outcome.outcome != "passed":
                    stopped = True
                    return
    except BaseException:
        stopped = True
        raise
    finally:
        if stopped or pending:
            for future in pending:
                future.cancel()
            _REGISTRY.stop(matrix)
        pool.shutdown(wait=True, cancel_futures=True)


# -- Dask ----------------------------------------------------------------------------------


def _tar_directory(path: Path) -> bytes:
    def keep(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
        # modules_install's build/source links point into the tree, which the worker has
        # not got (and the data filter refuses absolute links); the initramfs skips them too.
        parts = Path(member.name).parts
        if member.issym() and parts[-1] in ("build", "source") and "modules" in parts:
            return None
        return member

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(path, arcname=".", filter=keep)
    return buffer.getvalue()


def _tree_probe(job: Job) -> VMSpec:
    """The job's VM description with its kernel tree, for checking the tree's config on the
    client (the tiny image's initramfs and command line stand in when it boots with them)."""
    fields = {k: v for k, v in job.vm.items() if k not in ("warm",)}
    arch = str(fields.get("arch", "x86_64"))
    if job.needs_image() == "tiny":
        fields.setdefault("append", images.tiny_append(arch))
    fields.setdefault("initrd", "initrd")  # a name: nothing reads it here
    return VMSpec.from_dict(fields)


def _files_to_ship(job: Job, workdir: Path, installed: dict[Path, Path]) -> dict[str, Path]:
    """The files a job's task needs, by key; a kernel tree becomes its image and modules.

    ``installed`` remembers the modules installed per tree (into ``workdir``), so a tree
    used by many jobs is installed once.
    """
    files = job.files()
    kernel = files.get("kernel")
    if kernel is None or not kernel.is_dir():
        return files
    where = f"job {job.name!r}"
    try:
        resolved = kconfig.resolve_kernel(_tree_probe(job), files.get("modules"))
    except SpecError as exc:
        raise SpecError(f"{where}: {exc.field}", exc.value, exc.reason) from exc
    assert resolved.tree is not None and resolved.spec.kernel is not None
    files["kernel"] = Path(resolved.spec.kernel)
    if resolved.install_tree_modules:
        root = resolved.tree.root.resolve()
        if root not in installed:
            target = workdir / f"modules-{len(installed)}"
            log.info("matrix: installing the modules of %s to ship them", root)
            installed[root] = kconfig.install_modules(resolved.tree, target)
        files["modules"] = installed[root]
    return files


def _read_for_shipping(key: str, path: Path) -> bytes:
    try:
        if key == "modules":
            if not path.is_dir():
                raise SpecError("modules", str(path), "no such directory")
            return _tar_directory(path)
        return path.read_bytes()
    except OSError as exc:
        raise SpecError(key, str(path), f"cannot read it to send it to the workers: "
                        f"{exc.strerror or exc}") from exc


def _extract_tree(tar: tarfile.TarFile, dest: Path) -> None:
    """Unpack ``tar`` into ``dest`` by the rules of tarfile's ``"data"`` filter.

    Python 3.11.4 added the filter; Debian 12's own python3 is 3.11.2, so where
    it is missing the same rules are checked here: every name and link stays
    inside ``dest``, only files, directories and links, no set-ID, sticky or
    group/other write bits, and no owner taken from the archive.
    """
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    root = os.path.realpath(dest)
    members = []
    for member in tar.getmembers():
        where = os.path.normpath(os.path.join(root, member.name))
        if os.path.isabs(member.name) or os.path.commonpath([root, where]) != root:
            raise tarfile.TarError(f"{member.name!r} would be written outside {dest}")
        if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
            raise tarfile.TarError(f"{member.name!r} is not a file, directory or link")
        if member.issym() or member.islnk():
            base = os.path.dirname(where) if member.issym() else root
            points = os.path.normpath(os.path.join(base, member.linkname))
            if os.path.isabs(member.linkname) or os.path.commonpath([root, points]) != root:
                raise tarfile.TarError(f"{member.name!r} links outside {dest}")
        member.mode &= 0o755
        member.uid, member.gid, member.uname, member.gname = os.getuid(), os.getgid(), "", ""
        members.append(member)
    tar.extractall(dest, members=members, numeric_owner=True)


def _materialize(key: str, digest: str, name: str, data: bytes) -> str:
    """Where this worker keeps the shipped file (written once, atomically)."""
    root = cache_dir() / "matrix-files" / digest
    target = root / name
    if target.exists():
        return str(target)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=root.parent))
    try:
        if key == "modules":
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                _extract_tree(tar, tmp / name)
        else:
            (tmp / name).write_bytes(data)
        try:
            os.rename(tmp, root)
        except OSError:
            if not target.exists():  # not a lost race with another task: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def run_job_on_worker(job: Job, files: Mapping[str, tuple[str, str, bytes]], matrix: str,
                      key: str) -> _Attempt:
    """The Dask task: put the shipped files in place, run the job, say where it ran."""
    worker: Any = importlib.import_module("distributed").get_worker()
    name = str(worker.name)
    worker.log_event(_EVENT_TOPIC, {"matrix": matrix, "job": job.name, "key": key, "worker_name": name,
                                    "host": socket.gethostname()})
    try:
        paths = {key: _materialize(key, digest, base, data)
                 for key, (digest, base, data) in files.items()}
    except OSError as exc:
        return _Attempt(None, f"cannot store the job's files on worker {name}: {exc}",
                        socket.gethostname(), name)
    return _run_attempt(job.with_files(paths), matrix, name)


def _run_dask(jobs: Sequence[Job], scheduler: str, retries: int, fail_fast: bool,
              progress: Callable[[MatrixProgress], None] | None, security: Any
              ) -> Generator[JobResult, None, None]:
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
            for key, path in _files_to_ship(job, Path(workdir), installed).items():
                data = _read_for_shipping(key, path)
                digest = hashlib.sha256(data).hexdigest()
                contents.setdefault(digest, data)
                refs[key] = (digest, path.name or key)
            shipped[job.name] = refs
    try:
        client = distributed.Client(scheduler, timeout=30, security=security)
    except OSError as exc:
        raise SpecError("scheduler", scheduler, f"cannot reach the Dask scheduler: {exc}") from exc
    matrix = uuid.uuid4().hex
    tracker = _Tracker(len(jobs), retries, progress, None)
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
        client.subscribe_topic(_EVENT_TOPIC, started)
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
                attempt = _Attempt(None, f"the task failed on the cluster: {exc!r}", "?", "?")
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
            if fail_fast and outcome.outcome != "passed":
                return
        finished_ok = True
    finally:
        if pending or not finished_ok:
            client.cancel(list(pending), force=True)
            try:
                client.run(stop_matrix_here, matrix)
            except Exception as exc:  # a worker that is gone took its VMs with it anyway
                log.warning("matrix %s: stopping the VMs on the workers failed: %r", matrix, exc)
        with contextlib.suppress(Exception):
            client.unsubscribe_topic(_EVENT_TOPIC)
        client.close()


# -- the entry point -----------------------------------------------------------------------


def _nothing() -> Generator[JobResult, None, None]:
    yield from ()


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
    in the consumer) stops every VM the matrix started, on every worker.
    ``crash_dir`` is every job's that names none (a panic or oops writes a crash
    bundle under it, on the host that ran the job; see :mod:`qemukit.crashdir`).
    """
    job_list = list(jobs)
    if crash_dir is not None:
        job_list = [job if job.crash_dir is not None
                    else dataclasses.replace(job, crash_dir=str(crash_dir)) for job in job_list]
    _check_unique(job_list)
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
        return _run_dask(job_list, scheduler, retries, fail_fast, progress, security)
    return _run_local(job_list, jobs_at_once or default_parallelism(job_list), retries,
                      fail_fast, progress)


# -- the report ----------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return json_safe(value)
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {json_safe(str(k)): _clean(v) for k, v in value.items()}
    return value


def write_jsonl(results: Iterable[JobResult], path: str | Path) -> None:
    """One JSON object per line and job (strict JSON, ASCII only)."""
    lines = [json.dumps(_clean(r.to_dict()), allow_nan=False) for r in results]
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="ascii")


def _text(text: str) -> str:
    if len(text) > JUNIT_TEXT_LIMIT:
        text = (f"[qemukit: the first {len(text) - JUNIT_TEXT_LIMIT} of {len(text)} characters "
                f"were cut]\n" + text[-JUNIT_TEXT_LIMIT:])
    return xml_safe(text)


def _attr(text: str, limit: int = 1000) -> str:
    return xml_safe(text if len(text) <= limit else text[: limit - 1] + "\u2026")


def write_junit(results: Iterable[JobResult], path: str | Path, *,
                suite: str = "qemukit.matrix") -> None:
    """One JUnit XML file, one test case per job named by its axes (always well-formed)."""
    ordered = sorted(results, key=lambda r: r.job.name)
    failures = sum(r.outcome in ("failed", "panic", "oops") for r in ordered)
    errors = sum(r.outcome in ("timeout", "error") for r in ordered)
    root = ET.Element("testsuites")
    ts = ET.SubElement(root, "testsuite", name=_attr(suite), tests=str(len(ordered)),
                       failures=str(failures), errors=str(errors),
                       time=f"{sum(r.result.duration for r in ordered):.3f}")
    for item in ordered:
        res = item.result
        case = ET.SubElement(ts, "testcase", classname=_attr(suite), name=_attr(item.job.name),
                             time=f"{res.duration:.3f}")
        props = ET.SubElement(case, "properties")
        values: list[tuple[str, Any]] = [(f"axis.{k}", v) for k, v in item.job.axes.items()]
        values += [("outcome", res.outcome), ("command", " ".join(res.command)),
                   ("exit_status", res.exit_status), ("host", item.host),
                   ("worker", item.worker), ("attempts", item.attempts),
                   ("accel", res.accel), ("boot_time", res.boot_time), ("panic", res.panic),
                   ("oops", res.oops), ("crash_bundle", res.crash_bundle),
                   *(("retried", r) for r in item.retried)]
        for name, value in values:
            if value is not None:
                ET.SubElement(props, "property", name=_attr(f"qemukit.{name}"),
                              value=_attr(str(value)))
        if res.outcome == "failed":
            ET.SubElement(case, "failure", message=f"exit status {res.exit_status}").text = (
                _text(res.stderr))
        elif res.outcome in ("panic", "oops"):
            line = res.panic if res.outcome == "panic" else res.oops
            ET.SubElement(case, "failure", message=_attr(f"kernel {res.outcome}: {line}")).text = (
                _text(res.console_tail))
        elif res.outcome in ("timeout", "error"):
            ET.SubElement(case, "error", message=_attr(res.error or res.outcome)).text = (
                _text(res.console_tail))
        ET.SubElement(case, "system-out").text = _text(res.stdout)
        ET.SubElement(case, "system-err").text = _text(res.stderr)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def summary(results: Sequence[JobResult], slowest: int = 5,
            jobs: Sequence[Job] | None = None) -> str:
    """A plain-text table: per axis value the count of each outcome, then the slowest jobs.

    Axis values are listed in the order of ``jobs`` (the matrix file's) when given.
    """
    lines: list[str] = []
    header = f"{'':24} " + " ".join(f"{o:>7}" for o in _OUTCOMES)
    axes: dict[str, list[str]] = {}
    for job in [*(jobs or ()), *(r.job for r in results)]:
        for axis, value in job.axes.items():
            values = axes.setdefault(axis, [])
            if value not in values:
                values.append(value)
    groups: list[tuple[str, list[JobResult]]] = [("all jobs", list(results))]
    for axis, values in axes.items():
        groups += [(f"{axis}={v}", [r for r in results if r.job.axes.get(axis) == v])
                   for v in values]
    lines.append(header)
    for label, members in groups:
        counts = [sum(r.outcome == o for r in members) for o in _OUTCOMES]
        lines.append(f"{label[:24]:24} " + " ".join(f"{c:>7}" for c in counts))
    retried = [r for r in results if r.attempts > 1]
    if retried:
        lines.append("")
        lines.append("retried (infrastructure failures):")
        lines += [f"  {r.job.name}: {r.attempts} attempts; " + "; ".join(r.retried)
                  for r in retried]
    lines.append("")
    lines.append("slowest:")
    for r in sorted(results, key=lambda r: -r.result.duration)[:slowest]:
        lines.append(f"  {r.result.duration:8.1f}s  {r.outcome:7}  {r.job.name}  ({r.worker})")
    return "\n".join(lines)
