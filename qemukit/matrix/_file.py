"""The matrix file: :class:`Job` and the TOML format that makes many of them.

See :mod:`qemukit.matrix` for the format. Pure: parsing reads no file but the
matrix itself, and every mistake is a :class:`~qemukit.errors.SpecError`
naming the key and the value.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import images
from ..errors import SpecError
from ..spec import VMSpec, load_toml, parse_size

__all__ = ["AXIS_KEYS", "JOB_KEYS", "SPEC_KEYS", "Job", "check_unique", "load_matrix",
           "parse_matrix"]

#: The keys of a job beyond the VM description's.
JOB_KEYS = ("name", "command", "timeout", "image", "modules", "continue_on_oops", "crash_dir",
            "axes")
#: A matrix axis whose values are not tables sets this key (``commands = {ok = ["true"]}``).
AXIS_KEYS = {"commands": "command", "kernels": "kernel", "images": "image", "appends": "append",
             "initrds": "initrd", "memories": "memory", "cpus": "cpus", "timeouts": "timeout"}
#: The VM description's keys a job accepts (the VM's own name is picked per run).
SPEC_KEYS = tuple(f.name for f in dataclasses.fields(VMSpec) if f.name != "name")


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
        unknown = sorted(set(self.vm) - set(SPEC_KEYS))
        if unknown:
            raise SpecError(f"{where}: {unknown[0]}", self.vm[unknown[0]],
                            f"unknown key; a job takes {', '.join(JOB_KEYS)} and the VM keys "
                            f"{', '.join(SPEC_KEYS)}")
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

        Resolved as every front end resolves a request (:mod:`qemukit.resolve`):
        a job on a built-in image starts warm unless it says ``warm = false`` (as
        ``qemukit run --image`` does); a job's ``kernel`` boots with the tiny
        initramfs on the machine ``qemukit run --kernel K -- CMD`` would pick
        (microvm for a kernel not run here before). A spec that cannot start
        warm (see :func:`qemukit.warm.warm_refusal`) boots cold.
        """
        from ..resolve import job_request, resolve

        return resolve(job_request(image=self.image, vm=self.vm, modules=self.modules,
                                   build=False)).spec

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
    unknown = sorted(set(table) - set(JOB_KEYS) - set(SPEC_KEYS))
    if unknown:
        raise SpecError(f"{where}.{unknown[0]}", table[unknown[0]],
                        f"unknown key; a job takes {', '.join(JOB_KEYS)} and the VM keys "
                        f"{', '.join(SPEC_KEYS)}")
    if "command" not in table:
        raise SpecError(f"{where}.command", None, "every job needs a command (an argv list)")
    extra_axes = table.get("axes", {})
    if not isinstance(extra_axes, Mapping):
        raise SpecError(f"{where}.axes", extra_axes, "must be a table of names")
    kwargs: dict[str, Any] = {k: table[k] for k in JOB_KEYS if k in table and k not in
                              ("name", "axes")}
    return Job(name=name, axes={**axes, **extra_axes},
               vm={k: v for k, v in table.items() if k in SPEC_KEYS}, **kwargs)


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
    check_unique(jobs)
    return jobs


def check_unique(jobs: Sequence[Job]) -> None:
    """Raise :class:`SpecError` naming the first job name used twice."""
    seen: set[str] = set()
    for job in jobs:
        if job.name in seen:
            raise SpecError("job.name", job.name, "two jobs have this name")
        seen.add(job.name)


def load_matrix(path: str | Path) -> list[Job]:
    """Read a matrix file (TOML); errors name the key and value, and the file."""
    return parse_matrix(load_toml(path), source=str(path))

