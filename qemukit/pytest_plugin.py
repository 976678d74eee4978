"""pytest fixtures for tests that need a real VM (registered via the ``pytest11`` entry point).

Fixtures a test asks for:

``qemu_vm``
    A booted VM of :func:`qemukit_spec` for one test (or shared by the tests of a
    module or session, see the scope below); a test marked
    ``@pytest.mark.qemukit(...)`` gets a VM of its own.
``qemu_vm_factory``
    ``qemu_vm_factory(spec=None, **overrides)`` boots VMs from ``qemukit_spec`` with
    fields overridden, or from your own specs; every VM it made is stopped at
    teardown, even when the test failed.
``qemu_network``
    ``qemu_network("server", "client", spec=None, **overrides)`` boots VMs of those
    names on one private network of their own (``vm.networks[...]`` holds each one's
    address; the names resolve in every guest); stopped at teardown like the factory's.
    It returns a :class:`VMNetwork`, a list of the VMs whose ``.forward("server", 80)``
    gives the host a port into one of them.
``qemu_clean_vm``
    A session-wide VM booted once; each test receives it rolled back to a snapshot
    taken right after boot, so what one test did in the guest is gone in the next.

Fixtures a suite overrides or parametrizes in its ``conftest.py`` (give the override
``scope=qemukit_scope``, the scope the run chose):

``qemukit_image``, ``qemukit_arch``
    The image and guest architecture (default: ``--qemukit-image``, ``--qemukit-arch``).
``qemukit_spec``
    The :class:`~qemukit.VMSpec` of ``qemu_vm`` and of the factory's VMs, built from
    the two above and the run's options; an override may take the plugin's own
    ``qemukit_spec`` and change it.

The scope of the VM fixtures is chosen at run time: ``--qemukit-scope`` (or the ini
option ``qemukit_scope``): ``function`` (default, a fresh VM per test), ``class``,
``module``, ``package`` or ``session``.

The marker ``@pytest.mark.qemukit(image="debian", memory="1G")`` gives one test its own
spec: ``image`` (and ``arch``) pick the base, every other key is a :class:`~qemukit.VMSpec`
field. An unknown key or a bad value fails that test's setup with the key named.

A failed test (setup or call) gets, for each VM it used, its console log, QEMU's log,
a screenshot where the VM has a display, and ``verdict.json`` (the test's outcome and
its VMs) in a directory of its own under ``--qemukit-artifacts`` (default
``qemukit-artifacts`` in the root directory); its report names the files. A passing
test writes nothing. ``--qemukit-keep-failed`` leaves a failing test's VMs running and
prints how to reach them; a guest that never became ready is always stopped.
``--qemukit-crash-dir DIR``: a failing test whose VM's kernel panicked or oopsed
leaves a crash bundle under DIR (see :mod:`qemukit.crashdir`), named in its report
and its JUnit case.

Under ``pytest -n`` (xdist) each worker's VMs are named after it (``gw0-…``; a
``qemu_network`` VM ``gw0-server`` goes by ``server`` on its network), port
forwards ask the kernel for free ports, and a worker's artifacts carry its id.

pytest loads this plugin in every run of an environment where qemukit is
installed, so the module itself imports nothing heavy: the VM machinery
(asyncio, qemu.qmp, :mod:`qemukit.vm`, the images) is imported when a
fixture is first used.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import pytest

if TYPE_CHECKING:
    from .resolve import Request
    from .spec import VMSpec
    from .vm import VM

_log = logging.getLogger("qemukit.pytest_plugin")

#: The VMs a test used (its own, and a shared one it was handed).
_VMS_KEY = pytest.StashKey[list["VM"]]()
#: VMs used by a test that failed (a shared VM may be kept for a look at its scope's end).
_FAILED_VMS_KEY = pytest.StashKey[list["VM"]]()
#: Evidence of VMs already stopped (a guest that never became ready), for the next failed report.
_PENDING_KEY = pytest.StashKey[list["_Evidence"]]()
CLEAN_TAG = "qemukit-clean"
ScopeName = Literal["function", "class", "module", "package", "session"]
SCOPES: tuple[ScopeName, ...] = ("function", "class", "module", "package", "session")
#: How much of a log is copied (its end): a runaway guest must not fill the disk.
_LOG_LIMIT = 8 * 1024 * 1024
_SCREENSHOT_TIMEOUT = 10.0


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register qemukit's command-line and ini options."""
    from .arch import ARCHES, DEFAULT_ARCH  # a pure table: keeps the plugin light

    group = parser.getgroup("qemukit", "VMs for tests (qemukit)")
    group.addoption("--qemukit-accel", default="tcg", choices=("auto", "kvm", "tcg"),
                    help="accelerator for fixture VMs (default: tcg)")
    group.addoption("--qemukit-image", default="tiny", help="image for fixture VMs (default: tiny)")
    group.addoption("--qemukit-arch", default=DEFAULT_ARCH,
                    choices=tuple(ARCHES),
                    help="guest architecture of fixture VMs (default: x86_64; the tiny image "
                         "for it is built on first use)")
    group.addoption("--qemukit-scope", default=None, choices=SCOPES,
                    help="scope of the VM fixtures: function (default), class, module, package "
                         "or session (ini: qemukit_scope)")
    group.addoption("--qemukit-artifacts", default=None, metavar="DIR",
                    help="where a failed test's console and QEMU logs, screenshot and verdict "
                         "go (default: qemukit-artifacts in the root directory; ini: "
                         "qemukit_artifacts)")
    group.addoption("--qemukit-boot-timeout", default=None, type=float, metavar="SECONDS",
                    help="how long a fixture VM may take to become ready (default: 120)")
    group.addoption("--qemukit-keep-failed", action="store_true",
                    help="leave a failing test's VMs running and print how to attach")
    group.addoption("--qemukit-crash-dir", metavar="DIR",
                    help="a failing test whose VM's kernel panicked or oopsed writes a crash "
                         "bundle under DIR (fixture VMs boot with panic=0 to wait for the dump)")
    group.addoption("--qemukit-cold", action="store_true",
                    help="boot every image VM instead of restoring its saved ready state")
    parser.addini("qemukit_scope", "scope of qemukit's VM fixtures (see --qemukit-scope)",
                  default="")
    parser.addini("qemukit_artifacts", "directory for failed tests' VM artifacts "
                  "(see --qemukit-artifacts; relative to the root directory)", default="")


def pytest_configure(config: pytest.Config) -> None:
    """Declare the ``qemukit`` marker (so ``--strict-markers`` accepts it)."""
    config.addinivalue_line(
        "markers", "qemukit(image=..., arch=..., **spec_fields): this test's VM gets its own "
                   "spec (image and VMSpec fields over qemukit_spec)")


def qemukit_scope(fixture_name: str, config: pytest.Config) -> ScopeName:
    """The scope of qemukit's VM fixtures, chosen at run time (pytest's dynamic scope).

    ``--qemukit-scope``, else the ini option ``qemukit_scope``, else ``function``.
    Overrides of ``qemukit_spec``, ``qemukit_image`` or ``qemukit_arch`` in a
    ``conftest.py`` take it too: ``@pytest.fixture(scope=qemukit_scope)``.
    """
    scope = config.getoption("--qemukit-scope") or str(config.getini("qemukit_scope")) or "function"
    if scope not in SCOPES:
        raise pytest.UsageError(f"qemukit_scope={scope!r}: must be one of {', '.join(SCOPES)}")
    return cast(ScopeName, scope)


def _worker(config: pytest.Config) -> str | None:
    """This process's xdist worker id (``gw0``...), None outside xdist."""
    workerinput = getattr(config, "workerinput", None)
    return str(workerinput["workerid"]) if workerinput else None


# -- the spec ---------------------------------------------------------------------------


def _request(config: pytest.Config, spec: VMSpec | None = None, *, image: str | None = None,
             arch: str | None = None, **overrides: Any) -> Request:
    """A fixture VM's request: an image (the run's, or ``image``) or ``spec``, used while it runs."""
    from .resolve import Request

    warm = overrides.pop("warm", False if config.getoption("--qemukit-cold") else None)
    if spec is not None:
        return Request(spec=spec, overrides=overrides, warm=warm, purpose="interactive")
    overrides.setdefault("accel", config.getoption("--qemukit-accel"))
    return Request(image=image or config.getoption("--qemukit-image"),
                   arch=arch or overrides.pop("arch", config.getoption("--qemukit-arch")),
                   overrides=overrides, warm=warm, purpose="interactive", build=True)


def _base_spec(config: pytest.Config, *, image: str | None = None, arch: str | None = None,
               **overrides: Any) -> VMSpec:
    """The one place the plugin assembles a spec: image, arch, the run's options, overrides,
    resolved as every front end resolves one (:mod:`qemukit.resolve`)."""
    from .resolve import resolve

    spec = resolve(_request(config, image=image, arch=arch, **overrides)).spec
    if config.getoption("--qemukit-crash-dir"):  # the last panic= wins: wait to be dumped
        spec = spec.replace(append=f"{spec.append or ''} panic=0".strip())
    return spec


def _marked_spec(request: pytest.FixtureRequest, base: VMSpec) -> VMSpec | None:
    """The spec ``@pytest.mark.qemukit(...)`` gives this test (None without the marker).

    Checked before anything boots: a positional argument, an unknown key or a bad
    value fails the test's setup with the key and value named.
    """
    from dataclasses import fields

    from .errors import QemukitError, SpecError
    from .spec import VMSpec

    marker = request.node.get_closest_marker("qemukit")
    if marker is None:
        return None
    where = f"@pytest.mark.qemukit on {request.node.nodeid}"
    if marker.args:
        pytest.fail(f"{where}: takes keywords only (image=..., memory=...), got "
                    f"{marker.args!r}", pytrace=False)
    known = {"image"} | {f.name for f in fields(VMSpec)}
    unknown = sorted(set(marker.kwargs) - known)
    if unknown:
        pytest.fail(f"{where}: unknown key {unknown[0]!r} (known: image and the VMSpec fields "
                    f"{', '.join(sorted(known - {'image'}))})", pytrace=False)
    overrides = dict(marker.kwargs)
    try:
        if "image" in overrides:
            image = overrides.pop("image")
            if not isinstance(image, str) or not image:
                raise SpecError("image", image, "must be an image name such as 'tiny'")
            return _base_spec(request.config, image=image,
                              arch=overrides.pop("arch", base.arch), **overrides)
        return base.replace(**overrides)
    except (QemukitError, TypeError) as exc:
        pytest.fail(f"{where}: {exc}", pytrace=False)


@pytest.fixture(scope=qemukit_scope)
def qemukit_image(pytestconfig: pytest.Config) -> str:
    """The image of the fixture VMs (``--qemukit-image``); override or parametrize it."""
    return str(pytestconfig.getoption("--qemukit-image"))


@pytest.fixture(scope=qemukit_scope)
def qemukit_arch(pytestconfig: pytest.Config) -> str:
    """The guest architecture of the fixture VMs (``--qemukit-arch``); override or parametrize it."""
    return str(pytestconfig.getoption("--qemukit-arch"))


@pytest.fixture(scope=qemukit_scope)
def qemukit_spec(pytestconfig: pytest.Config, qemukit_image: str, qemukit_arch: str) -> VMSpec:
    """The spec of ``qemu_vm`` and the factory's VMs; override it to describe your own VM."""
    return _base_spec(pytestconfig, image=qemukit_image, arch=qemukit_arch)


# -- booting and stopping ------------------------------------------------------------------


def _track(request: pytest.FixtureRequest, vm: VM) -> None:
    vms = request.node.stash.setdefault(_VMS_KEY, [])
    if not any(v is vm for v in vms):
        vms.append(vm)


def _named(config: pytest.Config, spec: VMSpec) -> VMSpec:
    """Under xdist, a generated name that says which worker the VM belongs to."""
    import secrets

    worker = _worker(config)
    if worker is None or spec.name is not None:
        return spec
    return spec.replace(name=f"{worker}-{secrets.token_hex(3)}")


def _boot(request: pytest.FixtureRequest, spec: VMSpec, *, keepable: bool = True,
          aliases: dict[str, str] | None = None) -> VM:
    """Start a VM of ``spec`` and wait until it is ready; a guest that never is gets stopped.

    ``keepable``: --qemukit-keep-failed may leave it running, so it must not die with pytest.
    ``aliases``: network -> the name the VM goes by there (``qemu_network`` under xdist).
    """
    from .timeouts import BOOT_TIMEOUT
    from .vm import VM, VMState

    config = request.config
    keep = keepable and bool(config.getoption("--qemukit-keep-failed"))
    timeout = config.getoption("--qemukit-boot-timeout") or BOOT_TIMEOUT
    vm = VM(_named(config, spec), die_with_parent=not keep, boot_timeout=timeout)
    if aliases:
        vm.networks.aliases.update(aliases)  # type: ignore[attr-defined]  # a Networks
    try:
        vm.start()
        vm.wait_ready()
    except BaseException as exc:
        # No test will run on it, so --qemukit-keep-failed does not apply: keep its
        # evidence for the failed report (not on Ctrl-C), then stop it now, not at exit.
        if vm.state is VMState.RUNNING:
            try:
                if isinstance(exc, Exception):
                    config.stash.setdefault(_PENDING_KEY, []).append(_collect(vm))
            finally:
                vm.shutdown(timeout=0)
        raise
    return vm


def _failed(config: pytest.Config, vm: VM) -> bool:
    return any(v is vm for v in config.stash.get(_FAILED_VMS_KEY, []))


def _finish(request: pytest.FixtureRequest, vm: VM) -> None:
    """Stop ``vm``, or leave it running if a test that used it failed and --qemukit-keep-failed."""
    from .vm import VMState

    if vm.state is not VMState.RUNNING:
        return
    if _failed(request.config, vm) and request.config.getoption("--qemukit-keep-failed"):
        name = vm.name
        vm.detach()
        whose = (f"failed test {request.node.nodeid}" if isinstance(request.node, pytest.Item)
                 else f"{request.node.nodeid or 'the session'}, used by a failed test")
        print(f"\nqemukit: kept VM {name!r} of {whose}: "
              f"'qemukit console {name}', 'qemukit exec {name} -- CMD', 'qemukit stop {name}'")
        return
    vm.shutdown(timeout=10)


@pytest.fixture(scope=qemukit_scope)
def _qemukit_scoped_vm(request: pytest.FixtureRequest, qemukit_spec: VMSpec) -> Iterator[VM]:
    """The VM of ``qemukit_spec`` that lives as long as the run's qemukit scope."""
    vm = _boot(request, qemukit_spec)
    try:
        yield vm
    finally:
        _finish(request, vm)


@pytest.fixture
def qemu_vm(request: pytest.FixtureRequest, qemukit_spec: VMSpec) -> Iterator[VM]:
    """A booted VM of ``qemukit_spec`` (or of the test's ``qemukit`` marker)."""
    marked = _marked_spec(request, qemukit_spec)
    if marked is None:
        vm: VM = request.getfixturevalue("_qemukit_scoped_vm")
        _track(request, vm)
        yield vm
        return
    own = _boot(request, marked)
    _track(request, own)
    try:
        yield own
    finally:
        _finish(request, own)


@pytest.fixture
def qemu_vm_factory(request: pytest.FixtureRequest,
                    qemukit_spec: VMSpec) -> Iterator[Callable[..., VM]]:
    """Boot VMs: ``qemu_vm_factory(spec=None, **overrides)`` (overrides over ``qemukit_spec``)."""
    from .errors import QemukitError

    made: list[VM] = []
    base = _marked_spec(request, qemukit_spec) or qemukit_spec

    def make(spec: VMSpec | None = None, *, _aliases: dict[str, str] | None = None,
             **overrides: Any) -> VM:
        from .resolve import resolve

        # The user's own spec (or the fixture's), resolved as every front end resolves one.
        vm = _boot(request, resolve(_request(request.config, spec or base, **overrides)).spec,
                   aliases=_aliases)
        _track(request, vm)
        made.append(vm)
        return vm

    try:
        yield make
    finally:
        errors: list[BaseException] = []
        for vm in made:
            try:
                _finish(request, vm)
            except QemukitError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


class VMNetwork(list["VM"]):
    """What ``qemu_network(...)`` returns: its VMs, in the order named, and their network.

    It unpacks like a list (``server, client = qemu_network("server", "client")``);
    :attr:`name` is the network's (made per call), :meth:`vm` finds a VM by the name
    the test gave it, :meth:`forward` gives the host a port into one.
    """

    def __init__(self, name: str, vms: list[VM], names: list[str]) -> None:
        super().__init__(vms)
        #: The network's name (``vm.networks[net.name]`` is each VM's place on it).
        self.name = name
        self._by_name = dict(zip(names, vms, strict=True))

    def vm(self, name: str) -> VM:
        """The VM the test named ``name``."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no VM named {name!r} on network {self.name!r}; its VMs: "
                           f"{', '.join(self._by_name)}") from None

    def forward(self, vm: VM | str, port: int) -> int:
        """A port on 127.0.0.1 into ``vm``'s TCP ``port`` (the host is not on a network
        until asked: see :func:`qemukit.network_forward`)."""
        from .vm import network_forward

        return network_forward(self.name, self.vm(vm) if isinstance(vm, str) else vm, port)


@pytest.fixture
def qemu_network(request: pytest.FixtureRequest,
                 qemu_vm_factory: Callable[..., VM]) -> Callable[..., VMNetwork]:
    """Boot VMs on one private network of this test: ``qemu_network("server", "client")``.

    The network's name is made per call (``gw0-…`` under pytest-xdist, so tests and
    workers never share one); the guests know each other by the names given. Under
    xdist the VMs themselves are named after the worker (``gw0-server``: VM names
    are per user, so two workers' "server"s would clash) and go by the given names
    on the network. Returns a :class:`VMNetwork` (a list of the VMs); ``spec`` and
    ``overrides`` are as for ``qemu_vm_factory`` (``networks=[...]`` adds networks
    shared by name, where the VMs go by their own names).
    """
    import secrets

    worker = _worker(request.config)

    def make(*names: str, spec: VMSpec | None = None, **overrides: Any) -> VMNetwork:
        if len(set(names)) != len(names):
            raise ValueError(f"qemu_network: a name twice in {names!r}")
        network = f"{worker}-{secrets.token_hex(4)}" if worker else f"t{secrets.token_hex(4)}"
        networks = (*overrides.pop("networks", ()), network)
        vms = [qemu_vm_factory(spec, **overrides, name=f"{worker}-{name}" if worker else name,
                               networks=networks, _aliases={network: name})
               for name in names]
        return VMNetwork(network, vms, list(names))

    return make


@pytest.fixture(scope="session")
def _qemukit_session_vm(request: pytest.FixtureRequest) -> Iterator[VM]:
    import tempfile

    from ._launch.process import run_command
    from .errors import HostError
    from .host import find_qemu, find_qemu_img
    from .spec import Drive
    from .vm import VMState

    # Internal snapshots need a writable qcow2 to hold the RAM state: give the VM a
    # small scratch disk that lives as long as the session.
    workdir = Path(tempfile.mkdtemp(prefix="qemukit-session-"))
    scratch = workdir / "scratch.qcow2"
    try:
        spec = _base_spec(request.config, warm=False)  # its scratch disk is written in place
        qemu_img = find_qemu_img(find_qemu(spec.arch))  # the QEMU of the VM's own arch
        made = run_command([qemu_img, "create", "-q", "-f", "qcow2", str(scratch), "64M"])
        if made.returncode != 0:
            raise HostError(f"cannot create the session VM's scratch disk {scratch}: "
                            f"{made.stderr.strip()}")
        vm = _boot(request, spec.replace(drives=(*spec.drives,
                                                 Drive(scratch, format="qcow2", id="scratch"))),
                   keepable=False)  # rolled back for each test: never kept
        try:
            vm.snapshots.save(CLEAN_TAG)
            yield vm
        finally:
            if vm.state is VMState.RUNNING:
                vm.shutdown(timeout=10)
    finally:
        scratch.unlink(missing_ok=True)
        workdir.rmdir()


@pytest.fixture
def qemu_clean_vm(request: pytest.FixtureRequest, _qemukit_session_vm: VM) -> VM:
    """The session VM, rolled back to its just-booted snapshot before this test."""
    vm = _qemukit_session_vm
    vm.snapshots.load(CLEAN_TAG)
    _track(request, vm)
    return vm


# -- artifacts of a failed test ------------------------------------------------------------


@dataclass
class _Evidence:
    """What one VM leaves for a failed test: files (name -> bytes) and facts for the verdict."""

    vm: str
    files: dict[str, bytes] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)


def _log_tail(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - _LOG_LIMIT))
            return fh.read()
    except FileNotFoundError:
        return None


def _collect(vm: VM) -> _Evidence:
    """Read what ``vm`` can show now; never raises (a report hook must not break the run)."""
    try:
        return _read_evidence(vm)
    except Exception as exc:
        _log.warning("qemukit: collecting the artifacts of VM %r failed: %r", vm.name, exc)
        return _Evidence(vm.name, facts={"name": vm.name, "collect_error": repr(exc)})


def _read_evidence(vm: VM) -> _Evidence:
    """Read what ``vm`` can show now: its logs, a screenshot if it has a display, its facts."""
    import tempfile

    from .errors import QemukitError, StateError
    from .vm import VMState

    name = vm.name
    ev = _Evidence(name, facts={"name": name, "state": vm.state.value, "pid": vm.pid,
                                "arch": vm.spec.arch, "accel": vm.accel.accel if vm.accel else None,
                                "argv": list(vm.argv)})
    runtime = vm.runtime
    if runtime is not None:
        rotated = _log_tail(runtime.console_log.with_name("console.log.1")) or b""
        console = _log_tail(runtime.console_log)
        if console is not None:
            ev.files[f"{name}.console.log"] = (rotated + console)[-_LOG_LIMIT:]
        qemu = _log_tail(runtime.qemu_log)
        if qemu is not None:
            ev.files[f"{name}.qemu.log"] = qemu
    if vm.state is VMState.RUNNING:
        with tempfile.TemporaryDirectory(prefix="qemukit-shot-") as tmp:
            try:
                shot = vm.screenshot(Path(tmp) / "screen.png", timeout=_SCREENSHOT_TIMEOUT)
                ev.files[f"{name}.screenshot.png"] = shot.read_bytes()
            except StateError as exc:
                ev.facts["screenshot"] = str(exc)  # no display: nothing to see
            except QemukitError as exc:
                ev.facts["screenshot"] = f"failed: {exc}"
    ev.facts["files"] = sorted(ev.files)
    return ev


def _artifact_root(config: pytest.Config) -> Path:
    option = config.getoption("--qemukit-artifacts")
    if option:
        return config.invocation_params.dir / str(option)
    ini = str(config.getini("qemukit_artifacts"))
    return Path(config.rootpath) / (ini or "qemukit-artifacts")


def _artifact_dir(config: pytest.Config, nodeid: str) -> Path:
    """One directory per test (and per xdist worker, which may run the same test id)."""
    import hashlib

    name = re.sub(r"[^A-Za-z0-9._=-]+", "_", nodeid.replace("/", ".").replace("::", "__"))
    if len(name) > 150:
        name = f"{name[:130]}-{hashlib.sha256(nodeid.encode()).hexdigest()[:16]}"
    worker = _worker(config)
    return _artifact_root(config) / (f"{name}@{worker}" if worker else name)


def _write_artifacts(item: pytest.Item, report: pytest.TestReport,
                     evidence: list[_Evidence]) -> Path:
    where = _artifact_dir(item.config, item.nodeid)
    shutil.rmtree(where, ignore_errors=True)  # an earlier failure's files would mislead
    where.mkdir(parents=True)
    for ev in evidence:
        for fname, data in ev.files.items():
            (where / fname).write_bytes(data)
    verdict = {
        "test": item.nodeid,
        "outcome": report.outcome,
        "when": report.when,
        "duration": round(report.duration, 3),
        "worker": _worker(item.config),
        "error": report.longreprtext,
        "vms": [ev.facts for ev in evidence],
    }
    (where / "verdict.json").write_text(json.dumps(verdict, indent=2, default=str) + "\n")
    return where


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """A failed test: its VMs' console tails in the report, and their artifacts on disk."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    config = item.config
    pending = config.stash.get(_PENDING_KEY, [])
    vms = item.stash.get(_VMS_KEY, [])
    if not report.failed:
        pending.clear()  # a boot failure the test expected and caught: not evidence
        if report.when == "call" and vms:
            # A stale directory of an earlier failed run of this test would mislead.
            shutil.rmtree(_artifact_dir(config, item.nodeid), ignore_errors=True)
        return
    if not vms and not pending:
        return
    from .vm import VMState

    config.stash.setdefault(_FAILED_VMS_KEY, []).extend(vms)
    for vm in vms:
        _guarded(report, f"the console tail of {vm.name}", _console_section, report, vm)
    if report.when != "teardown" or pending:  # at teardown a test's own VMs are gone
        def artifacts() -> None:
            evidence = [*pending, *(_collect(vm) for vm in vms if vm.state is VMState.RUNNING)]
            pending.clear()
            where = _write_artifacts(item, report, evidence)
            listing = "\n".join(f"  {p.name}" for p in sorted(where.iterdir()))
            report.sections.append(("qemukit artifacts", f"{where}\n{listing}"))

        _guarded(report, "the artifacts", artifacts)
        pending.clear()
    _crash_bundles(item, report, vms)  # last: it kills a VM whose kernel panicked


def _guarded(report: pytest.TestReport, what: str, step: Callable[..., None], *args: Any) -> None:
    """Run one step of the failure report; if it fails, log it and say so in the report.

    The test's own failure is what the report is for: qemukit's evidence
    gathering (a full disk, an artifacts directory that cannot be written, a VM
    gone wrong) must never replace it with an internal error that ends the run.
    """
    try:
        step(*args)
    except Exception as exc:  # noqa: BLE001 -- any failure here is qemukit's, not the test's
        _log.warning("qemukit: %s could not be kept: %r", what, exc)
        report.sections.append((f"qemukit: {what} could not be kept", f"{type(exc).__name__}: {exc}"))


def _console_section(report: pytest.TestReport, vm: VM) -> None:
    tail = vm.console_tail(40)
    if tail:
        report.sections.append((f"qemukit console of {vm.name} (last 40 lines)", tail))


def _crash_bundles(item: pytest.Item, report: pytest.TestReport, vms: list[VM]) -> None:
    """With --qemukit-crash-dir, a bundle of each VM whose kernel panicked or oopsed."""
    crash_dir = item.config.getoption("--qemukit-crash-dir")
    if not crash_dir:
        return
    for vm in vms:
        if vm.state.value == "running":
            _guarded(report, f"the crash bundle of {vm.name}", _crash_bundle, item, report, vm,
                     crash_dir)


def _crash_bundle(item: pytest.Item, report: pytest.TestReport, vm: VM, crash_dir: str) -> None:
    from .crashdir import bundle_from_vm

    bundle = bundle_from_vm(vm, crash_dir, test=item.nodeid)
    if bundle is not None:  # --junitxml takes the teardown report's: in the case
        item.user_properties.append(("qemukit.crash_bundle", str(bundle)))
        report.sections.append(("qemukit crash bundle", str(bundle)))
        vm.kill()  # paused after its panic: no power button would be heard
