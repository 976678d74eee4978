"""pytest fixtures for tests that need a real VM (registered via the ``pytest11`` entry point).

Fixtures:

``qemu_vm``
    A booted VM of ``--qemukit-image`` (default: tiny) for one test, stopped after it.
``qemu_vm_factory``
    ``qemu_vm_factory(spec=None, **overrides)`` boots VMs from your own specs; every VM
    it made is stopped at teardown, even when the test failed.
``qemu_network``
    ``qemu_network("server", "client", spec=None, **overrides)`` boots VMs of those
    names on one private network of their own (``vm.networks[...]`` holds each one's
    address; the names resolve in every guest); stopped at teardown like the factory's.
``qemu_clean_vm``
    A session-wide VM booted once; each test receives it rolled back to a snapshot
    taken right after boot, so what one test did in the guest is gone in the next.

Options: ``--qemukit-accel`` (default tcg), ``--qemukit-image`` (default tiny),
``--qemukit-keep-failed`` (leave a failing test's VM running and print how to reach
it), ``--qemukit-crash-dir DIR`` (a failing test whose VM's kernel panicked or
oopsed leaves a crash bundle under DIR, see :mod:`qemukit.crashdir`, named in
its report and its JUnit case). A failing test's report gets the tail of each of
its VMs' serial consoles.
The fixtures are thin wrappers over :class:`qemukit.VM`; names are generated per VM
and port forwards ask the kernel for free ports, so ``pytest -n`` is safe.

pytest loads this plugin in every run of an environment where qemukit is
installed, so the module itself imports nothing heavy: the VM machinery
(asyncio, qemu.qmp, :mod:`qemukit.vm`, the images) is imported when a
fixture is first used.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .spec import VMSpec
    from .vm import VM

_VMS_KEY = pytest.StashKey[list["VM"]]()
#: Set on a test item whose call failed (its VMs may be kept for a look).
_FAILED_KEY = pytest.StashKey[bool]()
CLEAN_TAG = "qemukit-clean"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register qemukit's command-line options."""
    from .arch import ARCHES  # a pure table: keeps the plugin light

    group = parser.getgroup("qemukit", "VMs for tests (qemukit)")
    group.addoption("--qemukit-accel", default="tcg", choices=("auto", "kvm", "tcg"),
                    help="accelerator for fixture VMs (default: tcg)")
    group.addoption("--qemukit-image", default="tiny", help="image for fixture VMs (default: tiny)")
    group.addoption("--qemukit-arch", default="x86_64",
                    choices=tuple(ARCHES),
                    help="guest architecture of fixture VMs (default: x86_64; the tiny image "
                         "for it is built on first use)")
    group.addoption("--qemukit-keep-failed", action="store_true",
                    help="leave a failing test's VMs running and print how to attach")
    group.addoption("--qemukit-crash-dir", metavar="DIR",
                    help="a failing test whose VM's kernel panicked or oopsed writes a crash "
                         "bundle under DIR (fixture VMs boot with panic=0 to wait for the dump)")
    group.addoption("--qemukit-cold", action="store_true",
                    help="boot every image VM instead of restoring its saved ready state")


def _base_spec(config: pytest.Config, **overrides: Any) -> VMSpec:
    from . import images

    image = config.getoption("--qemukit-image")
    arch = config.getoption("--qemukit-arch")
    if arch != "x86_64":
        overrides.setdefault("arch", arch)
        images.build(image, arch=arch)
    else:
        images.build(image)
    overrides.setdefault("warm", not config.getoption("--qemukit-cold"))
    spec = images.spec(image, accel=config.getoption("--qemukit-accel"), **overrides)
    if config.getoption("--qemukit-crash-dir"):  # the last panic= wins: wait to be dumped
        spec = spec.replace(append=f"{spec.append or ''} panic=0".strip())
    return spec


def _track(request: pytest.FixtureRequest, vm: VM) -> None:
    request.node.stash.setdefault(_VMS_KEY, []).append(vm)


def _finish(request: pytest.FixtureRequest, vm: VM) -> None:
    """Stop ``vm``, or leave it running if its test failed and --qemukit-keep-failed."""
    from .vm import VMState

    if vm.state is not VMState.RUNNING:
        return
    failed = request.node.stash.get(_FAILED_KEY, False)
    if failed and request.config.getoption("--qemukit-keep-failed"):
        name = vm.name
        vm.detach()
        print(f"\nqemukit: kept VM {name!r} of failed test {request.node.nodeid}: "
              f"'qemukit console {name}', 'qemukit exec {name} -- CMD', 'qemukit stop {name}'")
        return
    vm.shutdown(timeout=10)


def _boot(request: pytest.FixtureRequest, spec: VMSpec) -> VM:
    from .vm import VM

    keep = bool(request.config.getoption("--qemukit-keep-failed"))
    vm = VM(spec, die_with_parent=not keep)
    _track(request, vm)
    vm.start()
    vm.wait_ready()
    return vm


@pytest.fixture
def qemu_vm(request: pytest.FixtureRequest) -> Iterator[VM]:
    """A booted VM of the configured image, for one test."""
    vm = _boot(request, _base_spec(request.config))
    try:
        yield vm
    finally:
        _finish(request, vm)


@pytest.fixture
def qemu_vm_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., VM]]:
    """Boot VMs from your own specs: ``qemu_vm_factory(spec=None, **overrides)``."""
    from .errors import QemukitError

    made: list[VM] = []

    def make(spec: VMSpec | None = None, **overrides: Any) -> VM:
        if spec is None:
            spec = _base_spec(request.config, **overrides)
        elif overrides:
            spec = spec.replace(**overrides)
        vm = _boot(request, spec)
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


@pytest.fixture
def qemu_network(request: pytest.FixtureRequest,
                 qemu_vm_factory: Callable[..., VM]) -> Callable[..., list[VM]]:
    """Boot VMs on one private network of this test: ``qemu_network("server", "client")``.

    The network's name is made per call (so tests and pytest-xdist workers never
    share one); ``vm.networks`` maps it to each VM's address. ``spec`` and
    ``overrides`` are as for ``qemu_vm_factory``.
    """
    import secrets

    def make(*names: str, spec: VMSpec | None = None, **overrides: Any) -> list[VM]:
        networks = (*overrides.pop("networks", ()), f"t{secrets.token_hex(4)}")
        if spec is None:
            spec = _base_spec(request.config, **overrides)
        elif overrides:
            spec = spec.replace(**overrides)
        return [qemu_vm_factory(spec.replace(name=name, networks=networks)) for name in names]

    return make


@pytest.fixture(scope="session")
def _qemukit_session_vm(request: pytest.FixtureRequest) -> Iterator[VM]:
    import tempfile
    from pathlib import Path

    from ._launch.process import run_command
    from .errors import HostError
    from .host import find_qemu
    from .spec import Drive
    from .vm import VM, VMState

    # Internal snapshots need a writable qcow2 to hold the RAM state: give the VM a
    # small scratch disk that lives as long as the session.
    workdir = Path(tempfile.mkdtemp(prefix="qemukit-session-"))
    scratch = workdir / "scratch.qcow2"
    qemu_img = find_qemu().qemu_img or "qemu-img"
    made = run_command([qemu_img, "create", "-q", "-f", "qcow2", str(scratch), "64M"])
    if made.returncode != 0:
        raise HostError(f"cannot create the session VM's scratch disk {scratch}: "
                        f"{made.stderr.strip()}")
    spec = _base_spec(request.config, warm=False)  # its scratch disk is written in place
    vm = VM(spec.replace(drives=(*spec.drives, Drive(scratch, format="qcow2", id="scratch"))))
    try:
        vm.start()
        vm.wait_ready()
        vm.snapshots.save(CLEAN_TAG)
        yield vm
    finally:
        try:
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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """Attach the console tail of the test's VMs to a failing report."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.failed:
        return
    item.stash[_FAILED_KEY] = True
    crash_dir = item.config.getoption("--qemukit-crash-dir")
    for vm in item.stash.get(_VMS_KEY, []):
        if crash_dir and vm.state.value == "running":
            from .crashdir import bundle_from_vm

            bundle = bundle_from_vm(vm, crash_dir, test=item.nodeid)
            if bundle is not None:  # --junitxml takes the teardown report's: in the case
                item.user_properties.append(("qemukit.crash_bundle", str(bundle)))
                report.sections.append(("qemukit crash bundle", str(bundle)))
                vm.kill()  # paused after its panic: no power button would be heard
        tail = vm.console_tail(40)
        if tail:
            report.sections.append((f"qemukit console of {vm.name} (last 40 lines)", tail))
