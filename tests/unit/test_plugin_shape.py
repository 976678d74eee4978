"""The plugin's shaping parts without QEMU: the run-time scope, the marker's checks, artifact paths.

The fixtures themselves, the artifacts of a failed test and xdist are exercised against the
real tiny guest in tests/integration/test_plugin.py.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from qemukit import VMSpec, images
from qemukit import pytest_plugin as plugin


class FakeConfig:
    def __init__(self, options: dict[str, Any] | None = None, ini: dict[str, str] | None = None,
                 root: Path = Path("/r"), worker: str | None = None) -> None:
        self.options = {"--qemukit-scope": None, "--qemukit-artifacts": None,
                        "--qemukit-image": "tiny", "--qemukit-arch": "x86_64",
                        "--qemukit-accel": "tcg", "--qemukit-cold": False,
                        "--qemukit-crash-dir": None, **(options or {})}
        self.ini = ini or {}
        self.rootpath = root
        self.invocation_params = SimpleNamespace(dir=Path("/cwd"))
        if worker is not None:
            self.workerinput = {"workerid": worker}

    def getoption(self, name: str) -> Any:
        return self.options[name]

    def getini(self, name: str) -> str:
        return self.ini.get(name, "")


def _request(mark: pytest.MarkDecorator | None, config: FakeConfig | None = None) -> Any:
    node = SimpleNamespace(nodeid="t.py::test_x",
                           get_closest_marker=lambda name: mark.mark if mark else None)
    return SimpleNamespace(node=node, config=config or FakeConfig())


BASE = VMSpec(kernel="/k", initrd="/i", cpus=2)


def test_scope_comes_from_the_option_then_the_ini_then_function() -> None:
    assert plugin.qemukit_scope("qemu_vm", FakeConfig()) == "function"  # type: ignore[arg-type]
    ini = FakeConfig(ini={"qemukit_scope": "module"})
    assert plugin.qemukit_scope("qemu_vm", ini) == "module"  # type: ignore[arg-type]
    both = FakeConfig({"--qemukit-scope": "session"}, ini={"qemukit_scope": "module"})
    assert plugin.qemukit_scope("qemu_vm", both) == "session"  # type: ignore[arg-type]
    with pytest.raises(pytest.UsageError, match="qemukit_scope='forever'"):
        plugin.qemukit_scope("qemu_vm", FakeConfig(ini={"qemukit_scope": "forever"}))  # type: ignore[arg-type]


def test_no_marker_no_spec_of_its_own() -> None:
    assert plugin._marked_spec(_request(None), BASE) is None


def test_marker_fields_go_over_the_users_spec() -> None:
    spec = plugin._marked_spec(_request(pytest.mark.qemukit(memory="1G")), BASE)
    assert spec is not None and (spec.memory, spec.cpus) == (1024, 2)


def test_marker_image_picks_the_base(monkeypatch: pytest.MonkeyPatch) -> None:
    from qemukit.errors import HostError

    built: list[tuple[str, str]] = []
    monkeypatch.setattr(images, "build", lambda name, arch="x86_64", **_: built.append((name, arch)))

    def image_spec(name: str, suite: object = None, packages: object = (), **kw: object) -> VMSpec:
        if not built:  # not built yet: the resolver builds it (once), then looks again
            raise HostError(f"image {name!r} is not built")
        return VMSpec(kernel=f"/{name}", initrd="/i", **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(images, "spec", image_spec)
    spec = plugin._marked_spec(_request(pytest.mark.qemukit(image="debian", memory="1G")), BASE)
    assert spec is not None and spec.kernel == "/debian" and spec.memory == 1024
    assert spec.cpus == 1  # the image's, not the base spec's
    assert built == [("debian", "x86_64")]


@pytest.mark.parametrize(("mark", "message"), [
    (pytest.mark.qemukit(memroy="1G"), "unknown key 'memroy'"),
    (pytest.mark.qemukit(memory="lots"), "memory='lots': expected a size"),
    (pytest.mark.qemukit(cpus=0), "cpus=0"),
    (pytest.mark.qemukit(image=""), "image='': must be an image name"),
    (pytest.mark.qemukit(image="nosuch"), "image='nosuch': unknown image"),
    (pytest.mark.qemukit("debian"), "takes keywords only"),
])
def test_a_bad_marker_fails_naming_the_key(mark: pytest.MarkDecorator, message: str) -> None:
    with pytest.raises(pytest.fail.Exception) as info:
        plugin._marked_spec(_request(mark), BASE)
    assert "@pytest.mark.qemukit on t.py::test_x: " in str(info.value)
    assert message in str(info.value)


def test_artifact_directory_per_test_and_per_worker() -> None:
    config = FakeConfig()
    where = plugin._artifact_dir(config, "tests/a b/test_x.py::TestY::test_z[1-x/y]")  # type: ignore[arg-type]
    assert where == Path("/r/qemukit-artifacts/tests.a_b.test_x.py__TestY__test_z_1-x.y_")
    worker = FakeConfig(worker="gw3")
    assert plugin._artifact_dir(worker, "t.py::test").name == "t.py__test@gw3"  # type: ignore[arg-type]
    long = plugin._artifact_dir(config, "t.py::test[" + "x" * 400 + "]")  # type: ignore[arg-type]
    assert len(long.name) < 160
    assert long != plugin._artifact_dir(config, "t.py::test[" + "x" * 401 + "]")  # type: ignore[arg-type]


def test_artifact_root_from_the_option_or_the_ini() -> None:
    opt = FakeConfig({"--qemukit-artifacts": "out"})
    assert plugin._artifact_root(opt) == Path("/cwd/out")  # type: ignore[arg-type]
    ini = FakeConfig(ini={"qemukit_artifacts": "results"})
    assert plugin._artifact_root(ini) == Path("/r/results")  # type: ignore[arg-type]
