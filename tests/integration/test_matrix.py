"""``qemukit matrix`` on real QEMU: the local pool, and a real Dask cluster on 127.0.0.1.

The 12-job matrix (2 kernel command lines x 2 memory sizes x 3 commands: one
passing, one failing, one panicking) runs once on the local pool and once on a
cluster of a scheduler and two workers started here as separate processes, each
worker with its own state and cache directories (standing in for two hosts).
A sampler thread counts the QEMUs under the state directories while they run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import QEMUKIT, qemu_gone, qemu_processes_under

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("matrix")]

# {kernel}: a copy of the tiny image's kernel outside every cache, so a cluster must ship it.
MATRIX_TEMPLATE = """
[defaults]
image = "tiny"
kernel = "{kernel}"
accel = "tcg"
timeout = 240

[matrix.kernels]
stock = {}
quiet = { append = "console=ttyS0 panic=-1 quiet memhp_default_state=online loglevel=1" }

[matrix.memories]
m256 = "256M"
m384 = "384M"

[matrix.commands]
ok = ["true"]
fails = ["sh", "-c", "echo broken >&2; exit 3"]
panics = ["sh", "-c", "echo c > /proc/sysrq-trigger"]
"""
EXPECTED = {"ok": ("passed", 0), "fails": ("failed", 3), "panics": ("panic", None)}
DASK = shutil.which("dask", path=str(Path(sys.executable).parent))


def _wait_for(what: str, check: Callable[[], Any], timeout: float, detail: Callable[[], str]
              ) -> Any:
    """Poll an outside process' state (no event to wait on) until ``check`` is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g}s for {what}; {detail()}")
        threading.Event().wait(0.1)


class Sampler:
    """Counts live QEMUs under some directories every 0.1 s, from a thread."""

    def __init__(self, *roots: Path) -> None:
        self.roots = roots
        self.peak = 0
        self.samples = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(0.1):
            count = sum(len(qemu_processes_under(root)) for root in self.roots)
            self.peak = max(self.peak, count)
            self.samples += 1

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def _env(state: Path, cache: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, QEMUKIT_STATE=str(state))
    if cache is not None:
        env["QEMUKIT_CACHE"] = str(cache)
    return env


def _results(path: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for line in path.read_text(encoding="ascii").splitlines():
        data = json.loads(line)
        out[data["name"]] = data
    return out


def _booted(state: Path) -> int:
    """VMs under ``state`` whose guest agent has answered (qemukit marks it in the VM's dir)."""
    return len(list(state.glob("*/guest-ready"))) if state.exists() else 0


def _state_entries(state: Path) -> list[str]:
    return sorted(p.name for p in state.iterdir()) if state.exists() else []


@dataclass
class Run:
    proc: subprocess.CompletedProcess[str]
    junit: Path
    results: dict[str, dict[str, Any]]
    peak: int
    samples: int
    seconds: float


def _run_matrix(directory: Path, text: str, env: dict[str, str], *args: str,
                roots: tuple[Path, ...]) -> Run:
    assert QEMUKIT
    matrix_file = directory / "matrix.toml"
    matrix_file.write_text(text)
    junit, jsonl = directory / "report.xml", directory / "results.jsonl"
    start = time.monotonic()
    with Sampler(*roots) as sampler:
        proc = subprocess.run([QEMUKIT, "matrix", str(matrix_file), "--junit", str(junit),
                               "--json", str(jsonl), *args], env=env, capture_output=True,
                              text=True, timeout=900, stdin=subprocess.DEVNULL, check=False)
    seconds = time.monotonic() - start
    assert jsonl.exists(), proc.stderr
    return Run(proc, junit, _results(jsonl), sampler.peak, sampler.samples, seconds)


@pytest.fixture(scope="module")
def kernel_copy(tmp_path_factory: pytest.TempPathFactory, tiny_image: Any) -> Path:
    path = tmp_path_factory.mktemp("kernel") / "vmlinuz"
    shutil.copyfile(tiny_image.kernel, path)
    return path


@pytest.fixture(scope="module")
def matrix_text(kernel_copy: Path) -> str:
    return MATRIX_TEMPLATE.replace("{kernel}", str(kernel_copy))


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory, matrix_text: str) -> Iterator[Run]:
    directory = tmp_path_factory.mktemp("matrix-local")
    state = directory / "state"
    run = _run_matrix(directory, matrix_text, _env(state), "--jobs", "2", roots=(state,))
    yield run
    assert qemu_processes_under(state) == []


def _check_results(run: Run) -> None:
    assert run.proc.returncode == 1, run.proc.stderr  # some jobs fail, on purpose
    assert len(run.results) == 12
    for name, data in run.results.items():
        kernel, memory, command = name.split("/")
        assert data["axes"] == {"kernels": kernel, "memories": memory, "commands": command}
        outcome, status = EXPECTED[command]
        assert (data["outcome"], data["result"]["exit_status"]) == (outcome, status), data
        assert data["result"]["accel"] == "tcg"
        if command == "fails":
            assert data["result"]["stderr"] == "broken\n"
        if command == "panics":
            assert "sysrq" in data["result"]["panic"].lower() or "panic" in data["result"]["panic"]


def test_local_pool_gets_every_result_right(local_run: Run) -> None:
    _check_results(local_run)
    assert {d["worker"] for d in local_run.results.values()} == {"local"}
    assert all(d["attempts"] == 1 and d["host"] == socket.gethostname()
               for d in local_run.results.values())
    summary = local_run.proc.stdout
    assert "commands=panics" in summary and "slowest:" in summary


def test_local_junit_is_valid_and_complete(local_run: Run) -> None:
    root = ET.parse(local_run.junit).getroot()
    suite = root.find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("12", "8", "0")
    cases = {c.get("name", ""): c for c in suite.iter("testcase")}
    assert set(cases) == set(local_run.results)
    for name, case in cases.items():
        kind = [child.tag for child in case if child.tag in ("failure", "error")]
        assert kind == ([] if name.endswith("/ok") else ["failure"]), name


def test_local_pool_runs_at_most_jobs_vms_at_once(local_run: Run) -> None:
    assert local_run.samples > 20
    assert local_run.peak == 2, f"peak {local_run.peak} QEMUs at once with --jobs 2"


# -- Dask ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Cluster:
    address: str
    root: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def state(self, worker: str) -> Path:
        return self.root / worker / "state"

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@dataclass(frozen=True)
class TLSFiles:
    """A CA and one certificate it signed (for 127.0.0.1), with its key: PEM files."""

    ca: Path
    cert: Path
    key: Path

    def args(self) -> list[str]:
        return ["--tls-ca-file", str(self.ca), "--tls-cert", str(self.cert),
                "--tls-key", str(self.key)]


def make_tls(directory: Path, name: str = "qemukit-test") -> TLSFiles:
    """A fresh CA and a certificate it signed, made with openssl (P-256, valid 2 days)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "node.pem", directory / "node.key", directory / "node.csr"
    ext = directory / "node.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    for argv in (
        ["openssl", "req", "-x509", *ec, "-days", "2", "-subj", f"/CN={name}-ca",
         "-keyout", str(ca_key), "-out", str(ca)],
        ["openssl", "req", *ec, "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr)],
        ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert)],
    ):
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return TLSFiles(ca, cert, key)


@contextmanager
def dask_cluster(root: Path, tiny_image: Any, workers: tuple[str, ...] = ("w1", "w2"),
                 tls: TLSFiles | None = None) -> Iterator[Cluster]:
    """A scheduler and workers (no nanny: the worker is the process) on 127.0.0.1.

    With ``tls`` every connection is TLS, each side presenting the one certificate.
    """
    assert DASK, "dask is not installed (pip install -e '.[test]')"
    from distributed import Client
    from distributed.security import Security

    scheme = "tls" if tls else "tcp"
    cluster = Cluster(f"{scheme}://127.0.0.1:{_free_port()}", root)
    port = cluster.address.rsplit(":", 1)[1]
    tls_args = tls.args() if tls else []
    security = Security(tls_ca_file=str(tls.ca), tls_client_cert=str(tls.cert),
                        tls_client_key=str(tls.key), require_encryption=True) if tls else None

    def spawn(name: str, argv: list[str], env: dict[str, str]) -> None:
        with open(root / f"{name}.log", "wb") as log:
            cluster.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL, env=env)

    try:
        spawn("scheduler", [DASK, "scheduler", "--host", "127.0.0.1", "--port", port,
                            "--protocol", scheme, *tls_args, "--no-dashboard"],
              dict(os.environ))
        for name in workers:
            cache = root / name / "cache"
            cache.mkdir(parents=True)
            # Each "host" has its own cache; the built image is linked in, not rebuilt.
            (cache / "tiny").symlink_to(Path(tiny_image.directory).parent)
            spawn(name, [DASK, "worker", cluster.address, "--name", name, "--resources", "vm=1",
                         "--nthreads", "2", "--no-nanny", "--no-dashboard", *tls_args],
                  _env(cluster.state(name), cache))
        with Client(cluster.address, timeout=60, security=security) as client:
            client.wait_for_workers(len(workers), timeout=120)
        yield cluster
    finally:
        # Workers first: a worker whose scheduler closes while it handles SIGTERM hangs in
        # its own close (distributed 2026.8) until killed.
        stages = [[p for n, p in cluster.procs.items() if n != "scheduler"],
                  [p for n, p in cluster.procs.items() if n == "scheduler"]]
        for stage in stages:
            for proc in stage:
                if proc.poll() is None:
                    proc.terminate()
            for proc in stage:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        leaked = qemu_processes_under(root)
        for leak in leaked:
            leak.kill()
        assert leaked == [], f"QEMUs left behind by the cluster: {leaked}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_image: Any) -> Iterator[Cluster]:
    with dask_cluster(tmp_path_factory.mktemp("cluster"), tiny_image) as running:
        yield running


def test_dask_cluster_gives_the_same_results_on_both_workers(
        tmp_path: Path, cluster: Cluster, local_run: Run, matrix_text: str,
        kernel_copy: Path) -> None:
    roots = (cluster.state("w1"), cluster.state("w2"))
    run = _run_matrix(tmp_path, matrix_text, _env(tmp_path / "client-state"), "--scheduler",
                      cluster.address, roots=roots)
    _check_results(run)
    assert {n: (d["outcome"], d["result"]["exit_status"]) for n, d in run.results.items()} == {
        n: (d["outcome"], d["result"]["exit_status"]) for n, d in local_run.results.items()}
    assert {d["worker"] for d in run.results.values()} == {"w1", "w2"}
    assert all(d["attempts"] == 1 for d in run.results.values())
    assert run.peak <= 2, f"{run.peak} QEMUs at once on two workers with vm=1 each"
    ET.parse(run.junit)
    digest = hashlib.sha256(kernel_copy.read_bytes()).hexdigest()
    for worker in ("w1", "w2"):
        assert qemu_processes_under(cluster.state(worker)) == []
        assert _state_entries(cluster.state(worker)) == []
        # The kernel reached each worker once, under its hash, whatever its jobs' count.
        shipped = cluster.root / worker / "cache" / "matrix-files"
        assert sorted(p.name for p in shipped.iterdir()) == [digest]
        assert (shipped / digest / "vmlinuz").read_bytes() == kernel_copy.read_bytes()


ONE_JOB = """
[defaults]
image = "tiny"
accel = "tcg"
timeout = 240

[matrix.commands]
ok = ["sh", "-c", "echo over-tls"]
"""


def test_a_tls_cluster_runs_jobs_for_certified_clients_only(tmp_path: Path,
                                                            tiny_image: Any) -> None:
    """tls:// with certificates from the options, then from Dask's configuration; a client
    without a certificate the cluster's CA signed (the attacker who reaches the port) is
    turned away before any job runs."""
    tls = make_tls(tmp_path / "tls")
    for directory in ("cluster", "by-options", "by-config"):
        (tmp_path / directory).mkdir()
    with dask_cluster(tmp_path / "cluster", tiny_image, workers=("w1",), tls=tls) as cluster:
        assert cluster.address.startswith("tls://")
        run = _run_matrix(tmp_path / "by-options", ONE_JOB, _env(tmp_path / "client-state"),
                          "--scheduler", cluster.address, *tls.args(),
                          roots=(cluster.state("w1"),))
        assert run.proc.returncode == 0, run.proc.stderr
        assert run.results["ok"]["outcome"] == "passed" and run.results["ok"]["worker"] == "w1"
        assert run.results["ok"]["result"]["stdout"] == "over-tls\n"
        # The same from Dask's own configuration (here its environment variables).
        env = _env(tmp_path / "client-state")
        env.update({"DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(tls.ca),
                    "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(tls.cert),
                    "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(tls.key)})
        run = _run_matrix(tmp_path / "by-config", ONE_JOB, env, "--scheduler", cluster.address,
                          roots=(cluster.state("w1"),))
        assert run.proc.returncode == 0, run.proc.stderr
        assert run.results["ok"]["outcome"] == "passed"

        assert QEMUKIT
        (tmp_path / "m.toml").write_text(ONE_JOB)

        def matrix(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([QEMUKIT, "matrix", str(tmp_path / "m.toml"), *args],
                                  env=_env(tmp_path / "client-state"), capture_output=True,
                                  text=True, timeout=300, stdin=subprocess.DEVNULL, check=False)

        # No certificate at all: refused before connecting, naming what is missing.
        bare = matrix("--scheduler", cluster.address)
        assert bare.returncode == 125 and "tls_ca_file" in bare.stderr, bare.stderr
        # A certificate of another CA: the cluster does not accept it.
        rogue = make_tls(tmp_path / "rogue", name="rogue")
        refused = matrix("--scheduler", cluster.address, "--tls-ca-file", str(tls.ca),
                         "--tls-cert", str(rogue.cert), "--tls-key", str(rogue.key))
        assert refused.returncode == 125, refused.stderr
        assert "cannot reach the Dask scheduler" in refused.stderr
        # Plain TCP to the TLS port: no.
        plain = matrix("--scheduler", cluster.address.replace("tls://", "tcp://"))
        assert plain.returncode == 125 and "cannot reach" in plain.stderr, plain.stderr
        assert qemu_processes_under(cluster.state("w1")) == []


SLOW = """
[defaults]
image = "tiny"
accel = "tcg"
timeout = 240
command = ["sh", "-c", "sleep 3"]

[matrix.n]
a = {}
b = {}
c = {}
d = {}
"""


def test_a_killed_worker_takes_its_vms_and_its_jobs_go_elsewhere(
        tmp_path: Path, tiny_image: Any) -> None:
    with dask_cluster(tmp_path, tiny_image) as cluster:
        assert QEMUKIT
        (tmp_path / "matrix.toml").write_text(SLOW)
        jsonl = tmp_path / "results.jsonl"
        with open(tmp_path / "cli.log", "wb") as log:
            cli = subprocess.Popen([QEMUKIT, "matrix", str(tmp_path / "matrix.toml"), "--json",
                                    str(jsonl), "--scheduler", cluster.address, "--retries", "2"],
                                   stdout=log, stderr=subprocess.STDOUT,
                                   env=_env(tmp_path / "client-state"))
        try:
            victims = _wait_for("a QEMU on worker w1",
                                lambda: qemu_processes_under(cluster.state("w1")), 120,
                                lambda: cluster.log("w1"))
            cluster.procs["w1"].send_signal(signal.SIGKILL)
            cluster.procs["w1"].wait(10)
            _wait_for("w1's QEMUs to die with it", lambda: all(qemu_gone(p.pid) for p in victims),
                      15, lambda: f"still there: {victims}")
            assert cli.wait(300) == 0, (tmp_path / "cli.log").read_text()
        finally:
            if cli.poll() is None:
                cli.kill()
        results = _results(jsonl)
        assert sorted(results) == list("abcd")
        assert all(d["outcome"] == "passed" for d in results.values())
        moved = [d for d in results.values() if d["attempts"] > 1]
        assert moved, results
        for data in moved:
            assert data["worker"] == "w2"
            assert any("worker w1" in why and "lost" in why for why in data["retried"]), data
        assert qemu_processes_under(cluster.state("w1")) == []


# Four jobs of one VM description: a matrix worker keeps a standby clone between them.
ONE_DESCRIPTION = """
[defaults]
image = "tiny"
accel = "tcg"
timeout = 240
command = ["true"]

[matrix.n]
a = {}
b = {}
c = {}
d = {}
"""


def _standby_watch(roots: tuple[Path, ...]) -> tuple[set[str], threading.Event, threading.Thread]:
    """Names of the standby clones seen under ``roots`` while a matrix runs (from a thread)."""
    seen: set[str] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.05):
            seen.update(name for root in roots for name in _state_entries(root)
                        if name.startswith("standby-"))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return seen, stop, thread


def test_the_local_pool_keeps_a_standby_within_its_jobs(tmp_path: Path, tiny_image: Any) -> None:
    """--jobs 2 and six jobs of one image: a job that ends leaves a standby in its place
    (one job runs: it fits), the next job takes it (-v says so), never more than 2 QEMUs
    counting the standby, none left afterwards."""
    assert QEMUKIT
    state = tmp_path / "state"
    text = ONE_DESCRIPTION.replace('d = {}', 'd = {}\ne = {}\nf = {}')
    (tmp_path / "matrix.toml").write_text(text)
    jsonl = tmp_path / "results.jsonl"
    seen, stop, watcher = _standby_watch((state,))
    try:
        with Sampler(state) as sampler:
            proc = subprocess.run([QEMUKIT, "-v", "matrix", str(tmp_path / "matrix.toml"),
                                   "--jobs", "2", "--json", str(jsonl)], env=_env(state),
                                  capture_output=True, text=True, timeout=600,
                                  stdin=subprocess.DEVNULL, check=False)
    finally:
        stop.set()
        watcher.join(10)
    assert proc.returncode == 0, proc.stderr
    assert {n: d["outcome"] for n, d in _results(jsonl).items()} == dict.fromkeys("abcdef",
                                                                                    "passed")
    assert seen, "no standby clone was made"
    assert "took the standby clone" in proc.stderr, proc.stderr[-3000:]
    assert sampler.samples > 10
    assert sampler.peak <= 2, f"peak {sampler.peak} QEMUs at once with --jobs 2"
    assert qemu_processes_under(state) == [] and _state_entries(state) == []


def test_a_workers_standby_ends_with_the_matrix(tmp_path: Path, cluster: Cluster) -> None:
    """Each worker (vm=1) keeps a standby between its jobs; once the matrix is over none is
    left there, though the worker process lives on (its exit would end them: too late)."""
    roots = (cluster.state("w1"), cluster.state("w2"))
    seen, stop, watcher = _standby_watch(roots)
    try:
        run = _run_matrix(tmp_path, ONE_DESCRIPTION, _env(tmp_path / "client-state"),
                          "--scheduler", cluster.address, roots=roots)
    finally:
        stop.set()
        watcher.join(10)
    assert run.proc.returncode == 0, run.proc.stderr
    assert {n: d["outcome"] for n, d in run.results.items()} == dict.fromkeys("abcd", "passed")
    assert seen, "no standby clone was made on either worker"
    assert run.peak <= 2, f"{run.peak} QEMUs at once on two workers with vm=1 each"
    # client.run ended them before the CLI returned: nothing to wait for.
    assert [qemu_processes_under(r) for r in roots] == [[], []]
    assert [_state_entries(r) for r in roots] == [[], []]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_every_vm_of_the_local_pool(tmp_path: Path, tiny_image: Any,
                                                 signum: int) -> None:
    assert QEMUKIT
    state = tmp_path / "state"
    (tmp_path / "matrix.toml").write_text(SLOW.replace("sleep 3", "sleep 120"))
    with open(tmp_path / "cli.log", "wb") as log:
        cli = subprocess.Popen([QEMUKIT, "matrix", str(tmp_path / "matrix.toml"), "--jobs", "2",
                                "--junit", str(tmp_path / "report.xml")], stdout=log,
                               stderr=subprocess.STDOUT, env=_env(state))
    try:
        # Both guests booted (their agent answered): the command is running when we stop.
        running = _wait_for("two booted guests", lambda: _booted(state) == 2 and
                            qemu_processes_under(state), 120,
                            lambda: (tmp_path / "cli.log").read_text())
        guest_pids = [p.pid for p in running]
        cli.send_signal(signum)
        start = time.monotonic()
        assert cli.wait(60) == 130, (tmp_path / "cli.log").read_text()
        assert time.monotonic() - start < 30
    finally:
        if cli.poll() is None:
            cli.kill()
    assert all(qemu_gone(pid) for pid in guest_pids)
    assert qemu_processes_under(state) == []
    assert _state_entries(state) == []
    ET.parse(tmp_path / "report.xml")  # what finished (nothing) is still a valid report


def test_ctrl_c_stops_every_vm_on_every_worker(tmp_path: Path, cluster: Cluster) -> None:
    assert QEMUKIT
    roots = [cluster.state("w1"), cluster.state("w2")]
    (tmp_path / "matrix.toml").write_text(SLOW.replace("sleep 3", "sleep 120"))
    with open(tmp_path / "cli.log", "wb") as log:
        cli = subprocess.Popen([QEMUKIT, "matrix", str(tmp_path / "matrix.toml"),
                                "--scheduler", cluster.address], stdout=log,
                               stderr=subprocess.STDOUT, env=_env(tmp_path / "client-state"))
    try:
        running = _wait_for("a booted guest on each worker",
                            lambda: all(_booted(r) for r in roots) and
                            [p for r in roots for p in qemu_processes_under(r)], 120,
                            lambda: (tmp_path / "cli.log").read_text())
        cli.send_signal(signal.SIGINT)
        assert cli.wait(60) == 130, (tmp_path / "cli.log").read_text()
        _wait_for("every VM of the matrix to stop", lambda: all(qemu_gone(p.pid) for p in running)
                  and not any(qemu_processes_under(r) for r in roots), 30,
                  lambda: f"still running: {[qemu_processes_under(r) for r in roots]}")
    finally:
        if cli.poll() is None:
            cli.kill()
    # The queued jobs were cancelled too: nothing starts on the workers afterwards.
    _wait_for("the state directories to empty", lambda: all(not _state_entries(r) for r in roots),
              30, lambda: str([_state_entries(r) for r in roots]))
    assert not any(qemu_processes_under(r) for r in roots)


def test_qemu_that_cannot_start_is_retried_and_the_report_says_so(
        tmp_path: Path, tiny_image: Any) -> None:
    text = ('[[job]]\nname = "nostart"\nimage = "tiny"\naccel = "tcg"\ncommand = ["true"]\n'
            'extra_args = ["-no-such-qemu-option"]\n')
    state = tmp_path / "state"
    run = _run_matrix(tmp_path, text, _env(state), "--retries", "1", roots=(state,))
    assert run.proc.returncode == 1, run.proc.stderr
    data = run.results["nostart"]
    assert data["outcome"] == "error" and data["attempts"] == 2, data
    assert len(data["retried"]) == 1 and "QEMU did not start" in data["retried"][0]
    assert "-no-such-qemu-option" in data["result"]["error"]
    assert "retried (infrastructure failures):" in run.proc.stdout
    assert qemu_processes_under(state) == [] and _state_entries(state) == []


def test_an_arch_axis_runs_each_job_on_its_architecture(tmp_path: Path, tiny_image: Any) -> None:
    """The matrix composes with the architectures: the image is built and booted per arch."""
    text = ('[defaults]\nimage = "tiny"\naccel = "tcg"\ncommand = ["uname", "-m"]\n'
            '[matrix.archs]\nx86 = { arch = "x86_64" }\narm = { arch = "aarch64" }\n')
    state = tmp_path / "state"
    run = _run_matrix(tmp_path, text, _env(state), "--jobs", "1", roots=(state,))
    assert run.proc.returncode == 0, run.proc.stderr
    machines = {name: data["result"]["stdout"].strip() for name, data in run.results.items()}
    assert machines == {"x86": "x86_64", "arm": "aarch64"}
    assert {data["result"]["arch"] for data in run.results.values()} == {"x86_64", "aarch64"}


def test_jobs_of_one_vm_description_share_one_warm_state(tmp_path: Path, tiny_image: Any) -> None:
    """Six commands over two descriptions: two warm states are built, the rest restore."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tiny").symlink_to(Path(tiny_image.directory).parent)
    text = ('[defaults]\nimage = "tiny"\naccel = "tcg"\n'
            '[matrix.memories]\nm384 = { memory = 384 }\nm512 = { memory = 512 }\n'
            '[matrix.commands]\na = ["true"]\nb = ["echo", "b"]\nc = ["false"]\n')
    state = tmp_path / "state"
    run = _run_matrix(tmp_path, text, _env(state, cache), "--jobs", "2", roots=(state,))
    assert run.proc.returncode == 1, run.proc.stderr  # the c jobs fail, on purpose
    assert {n: d["result"]["exit_status"] for n, d in run.results.items()} == {
        "m384/a": 0, "m384/b": 0, "m384/c": 1, "m512/a": 0, "m512/b": 0, "m512/c": 1}
    entries = [p for p in (cache / "warm").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(entries) == 2, entries


# -- stopping VMs that are still starting ---------------------------------------------------

# "fails" boots cold and fails at once. The two "hangs" jobs start warm on a fresh cache,
# so their start boots a builder VM to save its ready state; with /bin/sh as PID 1 their
# agent never answers, so that start would last the whole 600 s boot timeout. They are
# starting (QEMU up, start() not returned) when "fails" fails: --fail-fast must stop them.
HANGS = """
[matrix.hangs]
m256 = { memory = "256M", append = "console=ttyS0 panic=-1 rdinit=/bin/sh", timeout = 600 }
m320 = { memory = "320M", append = "console=ttyS0 panic=-1 rdinit=/bin/sh", timeout = 600 }

[defaults]
image = "tiny"
accel = "tcg"
command = ["true"]
"""
STARTING = HANGS + """
[[job]]
name = "fails"
warm = false
timeout = 240
command = ["false"]
"""


def _fresh_cache(tmp_path: Path, tiny_image: Any) -> Path:
    """A cache with the built tiny image and no warm states: every warm start builds one."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tiny").symlink_to(Path(tiny_image.directory).parent)
    return cache


def _warm_states(cache: Path) -> list[str]:
    warm = cache / "warm"
    return sorted(p.name for p in warm.iterdir()
                  if p.is_dir() and not p.name.startswith(".")) if warm.exists() else []


def test_fail_fast_stops_the_vms_that_are_still_starting(tmp_path: Path, tiny_image: Any) -> None:
    assert QEMUKIT
    cache, state = _fresh_cache(tmp_path, tiny_image), tmp_path / "state"
    (tmp_path / "matrix.toml").write_text(STARTING)
    jsonl = tmp_path / "results.jsonl"
    start = time.monotonic()
    with Sampler(state) as sampler:
        proc = subprocess.run([QEMUKIT, "matrix", str(tmp_path / "matrix.toml"), "--jobs", "3",
                               "--fail-fast", "--retries", "0", "--json", str(jsonl)],
                              env=_env(state, cache), capture_output=True, text=True,
                              timeout=300, stdin=subprocess.DEVNULL, check=False)
    took = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr
    results = _results(jsonl)
    assert list(results) == ["fails"] and results["fails"]["outcome"] == "failed"
    assert "2 of 3 jobs did not run (--fail-fast)" in proc.stderr
    # All three QEMUs ran at once: the two builders were starting when "fails" failed...
    assert sampler.peak == 3, f"peak {sampler.peak} QEMUs"
    # ...and were stopped then, not after their 600 s boot timeout (the old code waited it out).
    assert took < 240, f"the matrix took {took:.0f}s to stop"
    assert qemu_processes_under(state) == [] and qemu_processes_under(cache) == []
    assert _state_entries(state) == []
    assert _warm_states(cache) == []  # no half-built state was kept either


def test_ctrl_c_stops_the_vms_that_are_still_starting(tmp_path: Path, tiny_image: Any) -> None:
    assert QEMUKIT
    cache, state = _fresh_cache(tmp_path, tiny_image), tmp_path / "state"
    (tmp_path / "matrix.toml").write_text(HANGS)
    with open(tmp_path / "cli.log", "wb") as log:
        cli = subprocess.Popen([QEMUKIT, "matrix", str(tmp_path / "matrix.toml"), "--jobs", "2"],
                               stdout=log, stderr=subprocess.STDOUT, env=_env(state, cache))
    try:
        starting = _wait_for("two warm-state builders booting",
                             lambda: len(qemu_processes_under(state)) == 2 and
                             qemu_processes_under(state), 120,
                             lambda: (tmp_path / "cli.log").read_text())
        pids = [p.pid for p in starting]
        cli.send_signal(signal.SIGINT)
        assert cli.wait(120) == 130, (tmp_path / "cli.log").read_text()
    finally:
        if cli.poll() is None:
            cli.kill()
    assert all(qemu_gone(pid) for pid in pids)
    assert qemu_processes_under(state) == [] and _state_entries(state) == []
    assert _warm_states(cache) == []


def test_fail_fast_stops_the_vms_still_starting_on_the_workers(
        tmp_path: Path, tiny_image: Any) -> None:
    """Two workers, one slot each: "fails" on one, a hanging warm start on the other. The
    client's fail-fast must reach the worker and end that start, not leave it to its
    600 s boot timeout there."""
    assert QEMUKIT
    text = "\n".join(line for line in STARTING.splitlines() if not line.startswith("m320"))
    (tmp_path / "cluster").mkdir()
    (tmp_path / "matrix.toml").write_text(text)
    with dask_cluster(tmp_path / "cluster", tiny_image) as cluster:
        roots = [cluster.state("w1"), cluster.state("w2")]
        jsonl = tmp_path / "results.jsonl"
        with Sampler(*roots) as sampler:
            proc = subprocess.run([QEMUKIT, "matrix", str(tmp_path / "matrix.toml"),
                                   "--scheduler", cluster.address, "--fail-fast",
                                   "--retries", "0", "--json", str(jsonl)],
                                  env=_env(tmp_path / "client-state"), capture_output=True,
                                  text=True, timeout=300, stdin=subprocess.DEVNULL, check=False)
        assert proc.returncode == 1, proc.stderr
        assert list(_results(jsonl)) == ["fails"]
        assert sampler.peak == 2, f"peak {sampler.peak} QEMUs"  # the builder was up
        _wait_for("the starting VM on the other worker to stop",
                  lambda: not any(qemu_processes_under(r) for r in roots)
                  and not any(_state_entries(r) for r in roots), 60,
                  lambda: f"{[qemu_processes_under(r) for r in roots]} "
                          f"{[_state_entries(r) for r in roots]}\n{cluster.log('w1')}"
                          f"\n{cluster.log('w2')}")
        for worker in ("w1", "w2"):
            assert _warm_states(cluster.root / worker / "cache") == []


def test_the_same_kernel_under_two_names_reaches_a_worker_once_per_name(
        tmp_path: Path, tiny_image: Any) -> None:
    """Two jobs whose kernels have the same bytes but other file names, on one worker: each
    is kept under its name in the one directory of their hash, and both jobs pass at the
    first attempt (the second name was refused there, forever, before)."""
    kernels = tmp_path / "a" / "vmlinuz", tmp_path / "b" / "bzImage"
    for path in kernels:
        path.parent.mkdir()
        shutil.copyfile(tiny_image.kernel, path)
    text = ('[defaults]\nimage = "tiny"\naccel = "tcg"\ntimeout = 240\ncommand = ["true"]\n'
            f'[matrix.kernels]\na = {{ kernel = "{kernels[0]}" }}\n'
            f'b = {{ kernel = "{kernels[1]}" }}\n')
    (tmp_path / "cluster").mkdir()
    with dask_cluster(tmp_path / "cluster", tiny_image, workers=("w1",)) as cluster:
        run = _run_matrix(tmp_path, text, _env(tmp_path / "client-state"), "--scheduler",
                          cluster.address, "--retries", "1", roots=(cluster.state("w1"),))
        assert run.proc.returncode == 0, run.proc.stderr
        assert {n: (d["outcome"], d["attempts"]) for n, d in run.results.items()} == {
            "a": ("passed", 1), "b": ("passed", 1)}
        digest = hashlib.sha256(kernels[0].read_bytes()).hexdigest()
        shipped = cluster.root / "w1" / "cache" / "matrix-files"
        assert {p.name: sorted(q.name for q in p.iterdir()) for p in shipped.iterdir()} == {
            digest: ["bzImage", "vmlinuz"]}
