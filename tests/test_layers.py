"""Each OS isolation layer on its own: the policy layer and every other OS layer switched off.

With the policy off a script is plain Python with real builtins (``import os``, ``open``,
``socket``, ``subprocess``), so what stops it here is the one layer under test and nothing
else. The file, process and network refusals have controls in a pool with every layer off,
where the same attempts work.

Pools run on an event loop of their own thread (:class:`tests.pools.LivePool`) so that the
tests of one layer share one pool. The network's layers have a module of their own,
``test_network_isolation``.
"""

from __future__ import annotations

import errno
import math
import os
import re
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox import isolation, landlock, seccomp, syscalls
from sandbox.config import PoolConfig
from sandbox.isolation import LAYERS
from tests.pools import (
    NOBODY,
    PYTHON_HIDDEN,
    ROOT_ONLY,
    SETTLE,
    USER_ALONE_XFAIL,
    LivePool,
    alive,
    attempt,
    eventually,
    live,
    ok_result,
    only,
    parent_of,
    processes_running,
    refusal,
)

UNISTD_64 = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")

# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["stdlib", "full"])
def tier(request: pytest.FixtureRequest) -> str:
    """Each layer is tested in the children of each tier's warm parent: the standard-library
    one and the one with the libraries imported (a pool of that tier alone)."""
    return str(request.param)


@pytest.fixture(scope="module")
def bare_pool(scratch_base: Path, tier: str) -> Iterator[LivePool]:
    """Every layer off: the control where every attempt below works."""
    with live(only(None, scratch_base, tiers=(tier,))) as pool:
        yield pool


@pytest.fixture(scope="module")
def full_pool(scratch_base: Path, tier: str) -> Iterator[LivePool]:
    """Every layer on, as configured by default."""
    config = PoolConfig(workers=1, warm_children=1, scratch_dir=str(scratch_base), tiers=(tier,))
    with live(config) as pool:
        yield pool


@pytest.fixture(scope="module")
def landlock_pool(scratch_base: Path, tier: str) -> Iterator[LivePool]:
    """Landlock alone."""
    if landlock.abi_version() == 0:
        pytest.skip("Landlock is not available in this kernel")
    with live(only("landlock", scratch_base, tiers=(tier,))) as pool:
        yield pool


@pytest.fixture(scope="module")
def seccomp_pool(scratch_base: Path, tier: str) -> Iterator[LivePool]:
    """The seccomp filter alone."""
    reason = seccomp.supported()
    if reason is not None:
        pytest.skip(reason)
    with live(only("seccomp", scratch_base, tiers=(tier,))) as pool:
        yield pool


@pytest.fixture(scope="module")
def user_pool(scratch_base: Path, tier: str) -> Iterator[LivePool]:
    """The user layer alone."""
    with live(only("user", scratch_base, tiers=(tier,))) as pool:
        yield pool


@pytest.fixture(scope="module")
def user_landlock_pool(scratch_base: Path, tier: str) -> Iterator[LivePool]:
    """The user and Landlock layers together, the policy and the other OS layers off."""
    if landlock.abi_version() == 0:
        pytest.skip("Landlock is not available in this kernel")
    disabled = ("policy", "limits", "seccomp", "network")
    config = PoolConfig(
        workers=1,
        warm_children=1,
        disabled_layers=disabled,
        scratch_dir=str(scratch_base),
        tiers=(tier,),
    )
    with live(config) as pool:
        yield pool


MEMORY_MB = 128
SCRATCH_LIMIT_MB = 1
LEAKY_ENVIRONMENT = {
    "EXECUTOR_API_KEYS": "layer-test:not-a-real-secret",
    "EXECUTOR_WORKERS": "3",
    "NATS_URL": "nats://127.0.0.1:4222",
}


@pytest.fixture(scope="module")
def limits_pool(scratch_base: Path, tier: str) -> Iterator[LivePool]:
    """The limits layer alone, started while the test process has service variables set."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in LEAKY_ENVIRONMENT.items():
            patch.setenv(key, value)
        config = only(
            "limits",
            scratch_base,
            memory_mb=MEMORY_MB,
            scratch_limit_mb=SCRATCH_LIMIT_MB,
            tiers=(tier,),
        )
        with live(config) as pool:
            yield pool


@pytest.fixture(scope="module")
def network_pool(scratch_base: Path, tier: str) -> Iterator[LivePool]:
    """The network layer alone, with the default ports (80, 443) and no allow list."""
    with live(only("network", scratch_base, tiers=(tier,))) as pool:
        yield pool


# Probes shared by the layers' tests and their controls.
READ_FILE = attempt(
    """
    with open(ctx["path"], encoding="utf-8", errors="replace") as handle:
        value = len(handle.read())
    """
)
WRITE_FILE = attempt(
    """
    with open(ctx["path"], "w", encoding="utf-8") as handle:
        handle.write("written from a run")
    value = "written"
    """
)
FORK = attempt(
    """
    import os
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    value = "forked"
    """
)
SUBPROCESS = attempt(
    """
    import subprocess
    value = subprocess.run(["true"], check=False).returncode
    """
)
EXECV = attempt(
    """
    import os
    os.execv("/bin/true", ["true"])
    value = "still here after exec"
    """
)
ALLOCATE = "def execute(ctx):\n    return len(bytearray(ctx['mb'] * 1024 * 1024))\n"
BIG_FILE = """
    import errno, os
    def execute(ctx):
        with open("small.bin", "wb") as handle:
            handle.write(b"s" * (ctx["limit"] // 2))
        report = {"small": os.path.getsize("small.bin")}
        try:
            with open("big.bin", "wb") as handle:
                handle.write(b"b" * (ctx["limit"] * 2))
        except OSError as exc:
            report["error"] = [type(exc).__name__, errno.errorcode.get(exc.errno)]
        report["big"] = os.path.getsize("big.bin")
        return report
    """
MANY_FILES = """
    import errno, os
    def execute(ctx):
        opened = []
        failure = None
        try:
            while len(opened) < 512:
                opened.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as exc:
            failure = errno.errorcode.get(exc.errno)
        finally:
            for fd in opened:
                os.close(fd)
        return [len(opened), failure]
    """


# -- controls: every layer off --------------------------------------------------------------------


def test_control_files_are_reachable_with_every_layer_off(
    bare_pool: LivePool, tmp_path: Path
) -> None:
    """With every layer off, the reads and writes the file layers refuse all work."""
    secret = tmp_path / "secret.txt"
    secret.write_text("not for scripts")
    canary = tmp_path / "canary.txt"
    assert ok_result(bare_pool.run(READ_FILE, path="/etc/passwd"))["value"] > 0
    assert ok_result(bare_pool.run(READ_FILE, path=str(secret))) == {
        "value": len("not for scripts")
    }
    assert ok_result(bare_pool.run(READ_FILE, path="/proc/1/status"))["value"] > 0
    assert ok_result(bare_pool.run(WRITE_FILE, path=str(canary))) == {"value": "written"}
    assert canary.read_text() == "written from a run"


@ROOT_ONLY
def test_control_runs_are_root_with_every_layer_off(
    bare_pool: LivePool, root_only_dir: Path
) -> None:
    """With every layer off (tests as root), runs are uid 0 and can write a root-only folder."""
    source = "import os\ndef execute(ctx):\n    return [os.getuid(), os.geteuid()]\n"
    assert ok_result(bare_pool.run(source)) == [0, 0]
    target = root_only_dir / "control.txt"
    assert ok_result(bare_pool.run(WRITE_FILE, path=str(target))) == {"value": "written"}
    assert target.exists()


def test_control_processes_work_with_every_layer_off(bare_pool: LivePool) -> None:
    """With every layer off, fork and subprocess work."""
    assert ok_result(bare_pool.run(FORK)) == {"value": "forked"}
    assert ok_result(bare_pool.run(SUBPROCESS)) == {"value": 0}


def test_control_limit_probes_pass_with_every_layer_off(bare_pool: LivePool) -> None:
    """With every layer off, the allocation, big file and many open files all succeed."""
    assert ok_result(bare_pool.run(ALLOCATE, mb=MEMORY_MB * 4)) == MEMORY_MB * 4 * 1024 * 1024
    limit = SCRATCH_LIMIT_MB * 1024 * 1024
    assert ok_result(bare_pool.run(BIG_FILE, limit=limit)) == {
        "small": limit // 2,
        "big": limit * 2,
    }
    assert ok_result(bare_pool.run(MANY_FILES)) == [512, None]


# -- landlock alone -------------------------------------------------------------------------------


def test_landlock_alone_refuses_reads_outside_its_paths(
    landlock_pool: LivePool, tmp_path: Path
) -> None:
    """Landlock alone refuses /etc/passwd, a secret outside the scratch folder and /proc/1."""
    secret = tmp_path / "secret.txt"
    secret.write_text("not for scripts")
    denied = refusal("PermissionError", "EACCES")
    for path in ("/etc/passwd", str(secret), "/proc/1/status"):
        assert ok_result(landlock_pool.run(READ_FILE, path=path)) == denied, path
    # What the rules do allow still reads: the run's own /proc entry and resolver files.
    assert ok_result(landlock_pool.run(READ_FILE, path="/proc/self/status"))["value"] > 0
    assert ok_result(landlock_pool.run(READ_FILE, path="/etc/hosts"))["value"] >= 0


def test_landlock_alone_refuses_writes_outside_the_scratch_folder(
    landlock_pool: LivePool, tmp_path: Path
) -> None:
    """Landlock alone refuses to create a canary in a folder the test owns; it never appears."""
    canary = tmp_path / "canary.txt"
    outcome = landlock_pool.run(WRITE_FILE, path=str(canary))
    assert ok_result(outcome) == refusal("PermissionError", "EACCES")
    assert not canary.exists()
    assert list(tmp_path.iterdir()) == []


def test_landlock_alone_allows_the_scratch_folder(landlock_pool: LivePool) -> None:
    """Under Landlock alone a run writes, reads, lists and removes files in its working folder."""
    source = """
        import os
        def execute(ctx):
            os.mkdir("sub")
            with open("sub/data.txt", "w", encoding="utf-8") as handle:
                handle.write("kept")
            with open(os.path.join(os.getcwd(), "sub", "data.txt"), encoding="utf-8") as handle:
                text = handle.read()
            listed = os.listdir("sub")
            os.remove("sub/data.txt")
            os.rmdir("sub")
            return [text, listed, os.listdir(".")]
        """
    # out/ is made for every run (what the script leaves there is stored).
    assert ok_result(landlock_pool.run(source)) == ["kept", ["data.txt"], ["out"]]


def test_landlock_alone_lets_standard_library_modules_load_lazily(landlock_pool: LivePool) -> None:
    """Under Landlock alone, standard-library modules the warm parent never loaded import."""
    source = """
        import sys
        def execute(ctx):
            names = ["email.mime.text", "wave", "colorsys", "xml.dom.minidom"]
            before = [name for name in names if name in sys.modules]
            import email.mime.text
            import wave
            import colorsys
            import xml.dom.minidom
            return {
                "preloaded": before,
                "mime": email.mime.text.MIMEText("hi").get_content_type(),
                "hls": [round(x, 3) for x in colorsys.rgb_to_hls(1.0, 0.0, 0.0)],
                "xml": xml.dom.minidom.parseString("<a><b/></a>").documentElement.tagName,
                "wave": wave.Wave_write.__name__,
            }
        """
    assert ok_result(landlock_pool.run(source)) == {
        "preloaded": [],
        "mime": "text/plain",
        "hls": [0.0, 0.5, 1.0],
        "xml": "a",
        "wave": "Wave_write",
    }


# -- seccomp alone --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "probe", [FORK, SUBPROCESS, EXECV], ids=["os.fork", "subprocess.run", "os.execv"]
)
def test_seccomp_alone_refuses_new_processes(seccomp_pool: LivePool, probe: str) -> None:
    """Seccomp alone makes fork, subprocess and exec fail with PermissionError (EPERM)."""
    assert ok_result(seccomp_pool.run(probe)) == refusal("PermissionError", "EPERM")


def test_seccomp_alone_lets_threads_run(seccomp_pool: LivePool) -> None:
    """Under seccomp alone a thread starts, runs in a thread of its own, and joins."""
    source = """
        import threading
        def execute(ctx):
            seen = []
            worker = threading.Thread(target=lambda: seen.append(threading.get_native_id()))
            worker.start()
            worker.join(10)
            return [worker.is_alive(), len(seen), seen[0] != threading.get_native_id()]
        """
    assert ok_result(seccomp_pool.run(source)) == [False, 1, True]


# -- user alone -----------------------------------------------------------------------------------


@ROOT_ONLY
@USER_ALONE_XFAIL
def test_user_alone_runs_as_nobody(user_pool: LivePool) -> None:
    """The user layer alone runs scripts as nobody (uid 65534) when the service is root."""
    source = "import os\ndef execute(ctx):\n    return [os.getuid(), os.geteuid()]\n"
    assert ok_result(user_pool.run(source)) == [NOBODY, NOBODY]


@ROOT_ONLY
@USER_ALONE_XFAIL
def test_user_alone_cannot_write_a_root_only_folder(
    user_pool: LivePool, root_only_dir: Path
) -> None:
    """Under the user layer alone a run can list but not write a root-owned 0755 folder."""
    (root_only_dir / "present.txt").write_text("listed")
    target = root_only_dir / "intruder.txt"
    source = """
        import errno, os
        def execute(ctx):
            listed = os.listdir(ctx["folder"])
            try:
                with open(ctx["target"], "w", encoding="utf-8") as handle:
                    handle.write("x")
            except OSError as exc:
                return [listed, type(exc).__name__, errno.errorcode.get(exc.errno)]
            return [listed, "written", None]
        """
    outcome = user_pool.run(source, folder=str(root_only_dir), target=str(target))
    assert ok_result(outcome) == [["present.txt"], "PermissionError", "EACCES"]
    assert not target.exists()


@ROOT_ONLY
def test_user_with_landlock_runs_as_nobody_with_one_capability(
    user_landlock_pool: LivePool,
) -> None:
    """With Landlock on too, runs are nobody, keeping at most CAP_DAC_READ_SEARCH."""
    assert user_landlock_pool.layer("user").active
    source = """
        import os
        def execute(ctx):
            with open("/proc/self/status", encoding="ascii") as handle:
                fields = dict(line.split(":", 1) for line in handle)
            return [os.getuid(), os.geteuid(), int(fields["CapEff"], 16), int(fields["CapPrm"], 16)]
        """
    expected = 1 << syscalls.CAP_DAC_READ_SEARCH if PYTHON_HIDDEN else 0
    assert ok_result(user_landlock_pool.run(source)) == [NOBODY, NOBODY, expected, expected]


# -- limits alone ---------------------------------------------------------------------------------


def test_limits_alone_stops_allocation_past_memory_mb(limits_pool: LivePool) -> None:
    """Under limits alone a run allocates a little, but past memory_mb ends memory_limit."""
    assert ok_result(limits_pool.run(ALLOCATE, mb=16)) == 16 * 1024 * 1024
    outcome = limits_pool.run(ALLOCATE, mb=MEMORY_MB * 4)
    assert outcome.status == "error"
    assert outcome.error is not None
    assert outcome.error.code == "memory_limit", outcome.error
    assert outcome.error.type == "MemoryError"


def test_limits_alone_stops_files_past_scratch_limit(limits_pool: LivePool) -> None:
    """Under limits alone a file past scratch_limit_mb fails EFBIG, caught by the script (the
    total of the folder is the quota's, tests/test_quota.py)."""
    limit = SCRATCH_LIMIT_MB * 1024 * 1024
    source = """
        import errno, os
        def execute(ctx):
            report = {}
            try:
                with open("big.bin", "wb") as handle:
                    handle.write(b"b" * (ctx["limit"] * 2))
            except OSError as exc:
                report["error"] = [type(exc).__name__, errno.errorcode.get(exc.errno)]
            report["big"] = os.path.getsize("big.bin")
            return report
        """
    assert ok_result(limits_pool.run(source, limit=limit)) == {
        "error": ["OSError", "EFBIG"],
        "big": limit,
    }


def test_limits_alone_caps_open_files(limits_pool: LivePool) -> None:
    """Under limits alone a run cannot hold more than 256 open files (EMFILE)."""
    count, failure = ok_result(limits_pool.run(MANY_FILES))
    assert failure == "EMFILE"
    assert 0 < count < isolation.MAX_OPEN_FILES


def test_limits_alone_sets_rlimits_from_the_job(limits_pool: LivePool) -> None:
    """Under limits alone RLIMIT_CPU follows the job's timeout; core, file and fd limits hold."""
    source = """
        import resource
        def execute(ctx):
            return {
                name: list(resource.getrlimit(getattr(resource, name)))
                for name in ("RLIMIT_CPU", "RLIMIT_CORE", "RLIMIT_FSIZE", "RLIMIT_NOFILE")
            }
        """
    for timeout in (3.0, 7.5):
        soft = math.ceil(timeout) + 1
        assert ok_result(limits_pool.run(source, timeout=timeout)) == {
            "RLIMIT_CPU": [soft, soft + 1],
            "RLIMIT_CORE": [0, 0],
            "RLIMIT_FSIZE": [SCRATCH_LIMIT_MB * 1024 * 1024] * 2,
            "RLIMIT_NOFILE": [isolation.MAX_OPEN_FILES] * 2,
        }


def test_limits_alone_runs_lead_their_own_session(limits_pool: LivePool) -> None:
    """Under limits alone the run is its own session and process-group leader."""
    source = """
        import os
        def execute(ctx):
            return [os.getsid(0), os.getpgid(0), os.getpid()]
        """
    sid, pgid, pid = ok_result(limits_pool.run(source))
    assert sid == pgid == pid


def test_limits_alone_environment_is_clean(limits_pool: LivePool) -> None:
    """The run sees no EXECUTOR_* or NATS_URL the test process has; HOME and TMPDIR are its cwd."""
    for key, value in LEAKY_ENVIRONMENT.items():
        assert os.environ.get(key) == value  # set while the pool started, and still set
    source = """
        import os, tempfile
        def execute(ctx):
            return {"env": dict(os.environ), "cwd": os.getcwd(), "tmp": tempfile.gettempdir()}
        """
    seen = ok_result(limits_pool.run(source))
    env, cwd = seen["env"], seen["cwd"]
    assert not [key for key in env if key.startswith(("EXECUTOR_", "NATS"))], env
    assert env["HOME"] == env["TMPDIR"] == seen["tmp"] == cwd
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    # Besides the allow list: where the run lives, and the pool's one-thread settings for the
    # numeric libraries.
    allowed = {
        *limits_pool.config.passthrough_env,
        *("PATH", "HOME", "TMPDIR", "LANG"),
        *("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"),
    }
    assert set(env) <= allowed - {"PYTHONPATH"}, env


def _sleepers_of(parent: int) -> set[int]:
    """``sleep 60`` processes whose parent is a child of ``parent``."""
    return {
        pid
        for pid in processes_running(["sleep", "60"])
        if parent_of(parent_of(pid) or 0) == parent
    }


def test_limits_timeout_kills_the_run_and_its_grandchild(limits_pool: LivePool) -> None:
    """With seccomp off too, a run that starts `sleep 60` and loops dies at its timeout with it."""
    assert not limits_pool.layer("seccomp").active
    source = """
        import subprocess
        def execute(ctx):
            subprocess.Popen(["sleep", "60"])
            while True:
                pass
        """
    timeout = 3.0
    started = time.monotonic()
    pending = limits_pool.submit(source, timeout=timeout)
    try:
        assert eventually(lambda: bool(_sleepers_of(limits_pool.parent_pid)), timeout)
        (sleeper,) = _sleepers_of(limits_pool.parent_pid)
        runner = parent_of(sleeper)
        assert runner is not None
    finally:
        outcome = pending.result(timeout + SETTLE)
    elapsed = time.monotonic() - started
    assert outcome.status == "timeout"
    assert outcome.error is not None
    assert outcome.error.code == "timeout"
    assert elapsed < timeout + limits_pool.config.kill_grace + 2
    assert eventually(lambda: not alive(runner))
    assert eventually(lambda: sleeper not in processes_running(["sleep", "60"]))


# -- the scratch folder ---------------------------------------------------------------------------


@pytest.mark.usefixtures("tier")  # the pools below are made for each tier
@pytest.mark.parametrize(
    "pool_name",
    ["bare_pool", "landlock_pool", "seccomp_pool", "user_pool", "limits_pool", "network_pool"],
)
def test_scratch_folder_exists_during_the_run_and_is_removed_after(
    request: pytest.FixtureRequest, pool_name: str
) -> None:
    """The run's working folder is its own private scratch folder, gone once it was reaped."""
    pool: LivePool = request.getfixturevalue(pool_name)
    source = """
        import os, stat
        def execute(ctx):
            cwd = os.getcwd()
            with open("probe.txt", "w", encoding="utf-8") as handle:
                handle.write("x")
            info = os.stat(cwd)
            return {
                "cwd": cwd,
                "pid": os.getpid(),
                "is_dir": stat.S_ISDIR(info.st_mode),
                "mode": stat.S_IMODE(info.st_mode),
                "files": os.listdir(cwd),
            }
        """
    seen = ok_result(pool.run(source))
    cwd = Path(seen["cwd"])
    assert seen["is_dir"]
    assert seen["mode"] == 0o700
    assert sorted(seen["files"]) == ["out", "probe.txt"]  # out/ is made for every run
    assert re.fullmatch("[0-9a-f]{32}", cwd.name)  # random: no run can guess another's
    assert str(seen["pid"]) not in cwd.name
    assert cwd.parent.parent == Path(pool.config.scratch_dir)
    assert eventually(lambda: not cwd.exists())


def test_scratch_root_is_removed_when_the_pool_closes(scratch_base: Path) -> None:
    """After close() the pool's scratch root (and its waiting children's folders) is gone."""
    source = "import os\ndef execute(ctx):\n    return os.getcwd()\n"
    with live(only(None, scratch_base)) as pool:
        root = Path(ok_result(pool.run(source))).parent
        assert root.is_dir()
    assert eventually(lambda: not root.exists(), timeout=2.0), sorted(os.listdir(root))


# -- what the pool reports ------------------------------------------------------------------------


def test_every_layer_is_active_by_default(full_pool: LivePool) -> None:
    """With the default configuration every layer is reported active on this host."""
    assert [status.name for status in full_pool.pool.layers] == list(LAYERS)
    inactive = [status for status in full_pool.pool.layers if not status.active]
    assert inactive == []
    outcome = full_pool.run("import math\ndef execute(ctx):\n    return math.factorial(5)\n")
    assert ok_result(outcome) == 120


@pytest.mark.usefixtures("tier")  # the pools below are made for each tier
@pytest.mark.parametrize(
    "pool_name",
    ["landlock_pool", "seccomp_pool", "user_pool", "limits_pool", "network_pool"],
)
def test_switched_off_layers_are_reported_inactive(
    request: pytest.FixtureRequest, pool_name: str
) -> None:
    """Each layer in disabled_layers but user is inactive, 'switched off by configuration'."""
    pool: LivePool = request.getfixturevalue(pool_name)
    disabled = pool.config.disabled_layers
    assert len(disabled) == len(LAYERS) - 1
    wrong = {
        name: pool.layer(name)
        for name in disabled
        if name != "user"
        and (pool.layer(name).active or pool.layer(name).detail != "switched off by configuration")
    }
    assert wrong == {}


@pytest.mark.usefixtures("tier")  # the pools below are made for each tier
@pytest.mark.parametrize(
    "pool_name",
    [
        "landlock_pool",
        "seccomp_pool",
        "limits_pool",
        "network_pool",
    ],
)
def test_switched_off_user_layer_is_reported_as_switched_off(
    request: pytest.FixtureRequest, pool_name: str
) -> None:
    """A user layer in disabled_layers is reported 'switched off by configuration'."""
    pool: LivePool = request.getfixturevalue(pool_name)
    assert "user" in pool.config.disabled_layers
    status = pool.layer("user")
    assert not status.active
    assert status.detail == "switched off by configuration", status


@pytest.mark.usefixtures("tier")  # the pools below are made for each tier
@pytest.mark.parametrize(
    "layer",
    ["landlock", "seccomp", pytest.param("user", marks=USER_ALONE_XFAIL), "limits", "network"],
)
def test_the_layer_under_test_is_active_on_its_own(
    request: pytest.FixtureRequest, layer: str
) -> None:
    """The one layer a single-layer pool keeps is reported active (so its tests test it)."""
    pool: LivePool = request.getfixturevalue(f"{layer}_pool")
    status = pool.layer(layer)
    assert status.active, status


# -- the seccomp filter itself --------------------------------------------------------------------

AUDIT_ARCH_X86_64 = 0x80000000 | 0x40000000 | 62  # __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE | EM_X86_64
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000


def _header_numbers() -> dict[str, int]:
    if not UNISTD_64.exists():
        pytest.skip(f"{UNISTD_64} is not installed on this host")
    pattern = re.compile(r"^#define __NR_(\w+)\s+(\d+)\s*$", re.MULTILINE)
    return {name: int(number) for name, number in pattern.findall(UNISTD_64.read_text())}


RUN_PID = 4242


def _x86_64_program(monkeypatch: pytest.MonkeyPatch) -> bytes:
    monkeypatch.setattr(seccomp, "machine", lambda: "x86_64")
    seccomp._program.cache_clear()
    try:
        return seccomp.build_filter(RUN_PID)
    finally:
        seccomp._program.cache_clear()


def _evaluate(program: bytes, nr: int, *args: int, arch: int = AUDIT_ARCH_X86_64) -> int:
    """Run the classic BPF ``program`` on one seccomp_data and return its verdict; ``args``
    are the syscall's first arguments (64-bit values, the rest 0)."""
    values = [value & 0xFFFFFFFFFFFFFFFF for value in (*args, 0, 0, 0, 0, 0, 0)[:6]]
    data = struct.pack("<iIQ6Q", nr, arch, 0, *values)
    instructions = list(struct.iter_unpack("<HBBI", program))
    accumulator = 0
    pc = 0
    for _ in range(len(instructions)):
        code, jt, jf, k = instructions[pc]
        if code == 0x20:  # BPF_LD | BPF_W | BPF_ABS
            (accumulator,) = struct.unpack_from("<I", data, k)
            pc += 1
        elif code == 0x54:  # BPF_ALU | BPF_AND | BPF_K
            accumulator &= k
            pc += 1
        elif code == 0x15:  # BPF_JMP | BPF_JEQ | BPF_K
            pc += 1 + (jt if accumulator == k else jf)
        elif code == 0x35:  # BPF_JMP | BPF_JGE | BPF_K
            pc += 1 + (jt if accumulator >= k else jf)
        elif code == 0x45:  # BPF_JMP | BPF_JSET | BPF_K
            pc += 1 + (jt if accumulator & k else jf)
        elif code == 0x05:  # BPF_JMP | BPF_JA
            pc += 1 + k
        elif code == 0x06:  # BPF_RET | BPF_K
            return k
        else:
            raise AssertionError(f"unexpected BPF opcode {code:#x} at {pc}")
    raise AssertionError("the program ran off its end or looped")


def test_seccomp_table_matches_the_kernel_headers() -> None:
    """Every syscall number in the x86_64 table equals the one in <asm/unistd_64.h>."""
    header = _header_numbers()
    table: dict[str, Any] = seccomp._X86_64
    numbers = {
        **table["refused"],
        **table["own_pid"],
        **table["own_which_who"],
        **{name: table[name] for name in seccomp.SINGLE_RULES},
    }
    assert table["arch"] == AUDIT_ARCH_X86_64
    for name in seccomp.NEWER_THAN_HEADERS:
        if name not in header:
            numbers.pop(name)  # checked where the headers have it
    missing = sorted(name for name in numbers if name not in header)
    assert not missing, f"not in {UNISTD_64}: {missing}"
    # name: (number in the table, number in the header)
    wrong = {name: (nr, header[name]) for name, nr in numbers.items() if header[name] != nr}
    assert wrong == {}


def test_other_hardcoded_syscall_numbers_match_the_kernel_headers() -> None:
    """The x86_64 numbers for Landlock, unshare and capset equal those in <asm/unistd_64.h>."""
    header = _header_numbers()
    assert header["landlock_create_ruleset"] == syscalls.SYS_LANDLOCK_CREATE_RULESET
    assert header["landlock_add_rule"] == syscalls.SYS_LANDLOCK_ADD_RULE
    assert header["landlock_restrict_self"] == syscalls.SYS_LANDLOCK_RESTRICT_SELF
    assert header["unshare"] == isolation.SYS_UNSHARE["x86_64"]
    assert header["capset"] == syscalls._SYS_CAPSET["x86_64"]


def test_seccomp_filter_verdicts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The built x86_64 filter refuses its table, fork-like clones, every socket but TCP,
    addressed sends, network ioctls, and calls aimed at another process than the run."""
    program = _x86_64_program(monkeypatch)
    assert len(program) % 8 == 0
    assert len(program) // 8 <= 4096  # BPF_MAXINSNS
    eperm, enosys = RET_ERRNO | errno.EPERM, RET_ERRNO | errno.ENOSYS
    table: dict[str, Any] = seccomp._X86_64
    for name, number in table["refused"].items():
        assert _evaluate(program, number) == eperm, name
    for name in ("connect", "bind", "listen", "accept", "accept4", "sendmsg", "sendmmsg"):
        assert _evaluate(program, table["refused"][name]) == eperm, name
    for name, number in {"read": 0, "write": 1, "openat": 257, "mmap": 9, "socketpair": 53,
                         "recvfrom": 45, "recvmsg": 47, "setsockopt": 54}.items():  # fmt: skip
        assert _evaluate(program, number) == RET_ALLOW, name
    clone_thread = 0x00010000 | 0x00000100 | 0x00000800  # CLONE_THREAD | CLONE_VM | CLONE_SIGHAND
    assert _evaluate(program, 56, clone_thread) == RET_ALLOW
    assert _evaluate(program, 56, 17) == eperm  # SIGCHLD only: fork
    assert _evaluate(program, 56, 0x4000 | 0x100 | 17) == eperm  # vfork's flags
    assert _evaluate(program, 435) == enosys
    # socket(): TCP over IPv4/IPv6, with or without NONBLOCK/CLOEXEC, protocol 0 or TCP.
    nonblock_cloexec = 0o4000 | 0o2000000
    for family in (socket.AF_INET, socket.AF_INET6):
        for kind in (socket.SOCK_STREAM, socket.SOCK_STREAM | nonblock_cloexec):
            for proto in (0, socket.IPPROTO_TCP):
                assert _evaluate(program, 41, family, kind, proto) == RET_ALLOW
        for kind in (socket.SOCK_DGRAM, socket.SOCK_RAW, socket.SOCK_SEQPACKET, 0x1000 | 1):
            assert _evaluate(program, 41, family, kind, 0) == eperm, (family, kind)
        assert _evaluate(program, 41, family, socket.SOCK_STREAM, 132) == eperm  # SCTP
        assert _evaluate(program, 41, family, socket.SOCK_STREAM, 262) == eperm  # MPTCP
    for family in (socket.AF_UNIX, socket.AF_NETLINK, socket.AF_PACKET, 3, 4, 5, 9, 38, 40):
        assert _evaluate(program, 41, family, socket.SOCK_STREAM, 0) == eperm, family
    # sendto: only without a destination address (both halves of the pointer checked).
    assert _evaluate(program, 44, 3, 0, 10, 0, 0) == RET_ALLOW
    assert _evaluate(program, 44, 3, 0, 10, 0, 0x7FFD_0000_1000) == eperm
    assert _evaluate(program, 44, 3, 0, 10, 0, 0x7FFD_0000_0000) == eperm
    # ioctl: interface and routing requests refused, file ones allowed.
    for request in (0x8912, 0x8915, 0x890B, 0x89F0):  # SIOCGIFCONF, SIOCGIFADDR, SIOCADDRT, ...
        assert _evaluate(program, 16, 3, request) == eperm, hex(request)
    for request in (0x5401, 0x541B, 0x8906, 0x4004_6611):  # TCGETS, FIONREAD, SIOCGSTAMP, ...
        assert _evaluate(program, 16, 3, request) == RET_ALLOW, hex(request)
    for request in (0x8901, 0x8902):  # FIOSETOWN, SIOCSPGRP: who an open file signals
        assert _evaluate(program, 16, 3, request) == eperm, hex(request)
    # fcntl: no command that signals a process of the run's choice, or watches a folder.
    for command in (8, 10, 15, 1026):  # F_SETOWN, F_SETSIG, F_SETOWN_EX, F_NOTIFY
        assert _evaluate(program, 72, 3, command) == eperm, command
    for command in (
        1,
        2,
        3,
        4,
        9,
        1030,
    ):  # F_GETFD, F_SETFD, F_GETFL, F_SETFL, ..., F_DUPFD_CLOEXEC
        assert _evaluate(program, 72, 3, command) == RET_ALLOW, command
    # fallocate: the plain mode only (it grows the file within RLIMIT_FSIZE).
    assert _evaluate(program, 285, 3, 0, 0, 4096) == RET_ALLOW
    for mode in (1, 2 | 1, 0x10):  # KEEP_SIZE, PUNCH_HOLE | KEEP_SIZE, ZERO_RANGE
        assert _evaluate(program, 285, 3, mode, 0, 4096) == eperm, mode
    # Calls aimed at a process: the run itself (or 0 where that means itself) only.
    for name, number in table["own_pid"].items():
        assert _evaluate(program, number, RUN_PID) == RET_ALLOW, name
        assert _evaluate(program, number, 1) == eperm, name
        assert _evaluate(program, number, RUN_PID + 1) == eperm, name
        assert _evaluate(program, number, -1) == eperm, name
        zero = RET_ALLOW if name not in ("tgkill", "rt_tgsigqueueinfo") else eperm
        assert _evaluate(program, number, 0) == zero, name
    for name, number in table["own_which_who"].items():
        which = 0 if name == "setpriority" else 1
        assert _evaluate(program, number, which, RUN_PID) == RET_ALLOW, name
        assert _evaluate(program, number, which, 0) == RET_ALLOW, name
        assert _evaluate(program, number, which, 1) == eperm, name
        assert _evaluate(program, number, which + 1, 0) == eperm, name  # a group or a user
    assert _evaluate(program, 0, arch=0xC00000B7) == RET_KILL_PROCESS  # an aarch64 call
    assert _evaluate(program, 0x40000000 | 0) == RET_KILL_PROCESS  # an x32 call


def test_each_child_gets_its_own_pid_in_the_filter() -> None:
    """The program built once is patched per child: another pid gives other verdicts."""
    if seccomp.supported() is not None:
        pytest.skip(seccomp.supported() or "")
    kill = seccomp._X86_64["own_pid"]["kill"]
    first, second = seccomp.build_filter(1000), seccomp.build_filter(2000)
    assert _evaluate(first, kill, 1000) == RET_ALLOW
    assert _evaluate(first, kill, 2000) == RET_ERRNO | errno.EPERM
    assert _evaluate(second, kill, 2000) == RET_ALLOW
    assert _evaluate(second, kill, 1000) == RET_ERRNO | errno.EPERM
