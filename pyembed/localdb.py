"""The embedded default: a private PostgreSQL cluster in $PYEMBED_HOME (default ./.pyembed).

$PYEMBED_HOME holds cluster.json (port, passwords, where the data lives). The data directory,
the server log, the socket folder and PL/Python's copy of pyembed live in $PYEMBED_HOME too,
unless the server's OS user (`postgres`, when pyembed runs as root) cannot traverse it (a home
folder of mode 0700, root's home): then they go to a private folder of that user under
/var/lib/pyembed (config.server_root), named by a hash of $PYEMBED_HOME, and cluster.json
records it. The user's own folders keep their permissions.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

from .config import home as default_home
from .config import package_dir, server_root
from .errors import ConfigError, DatabaseNotReady, InvalidInput

DATABASE = "pyembed"
REPLICA_NAME = re.compile(r"[a-z0-9_-]{1,40}")
OWNER = "pyembed"
APP_USER = "pyembed_user"
APP_GROUP = "pyembed_app"
WORKER_USER = "pyembed_worker_user"
WORKER_GROUP = "pyembed_worker"
OPERATOR_GROUP = "pyembed_operator"
"""The operator's reach (revision 0037): WORKER_USER is in it, so that the one worker embeds every
tenant's queued documents, acting for each job's tenant, and `pyembed metrics serve` reports
every tenant."""
"""`pyembed worker`'s login: an application role that is in pyembed_worker too, so that it counts
failed provider calls (revision 0026), which the application login may not."""
SERVER_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "60",
    "shared_buffers": "'256MB'",
    "maintenance_work_mem": "'512MB'",
    "max_parallel_maintenance_workers": "1",
    "log_min_messages": "warning",
}
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PortMove:
    """The recorded port was held by another program, so the cluster listens elsewhere now."""

    old: int
    new: int

    def __str__(self) -> str:
        return (f"port {self.old} is taken by another program; the local cluster moved to "
                f"{self.new}: DSNs handed out before must be renewed (pyembed db url)")


@dataclass
class ClusterState:
    port: int
    bindir: str
    os_user: str | None
    owner_password: str
    app_password: str
    server_dir: str | None = None
    """The server's own folder when it is not $PYEMBED_HOME (the OS user cannot reach that)."""
    worker_password: str | None = None
    """WORKER_USER's; None in a cluster made before it had one (made at its next use)."""


def find_bindir() -> str:
    """The PostgreSQL server binaries: $PYEMBED_PG_BINDIR, pg_config, or the newest under /usr/lib."""
    explicit = os.environ.get("PYEMBED_PG_BINDIR")
    candidates = [explicit] if explicit else []
    pg_config = shutil.which("pg_config")
    if pg_config and not explicit:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
                         reverse=True)
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return c
    raise ConfigError("PostgreSQL server binaries not found: run docker/install-host.sh "
                      "or set PYEMBED_PG_BINDIR")


def _quoted_setting(value: str) -> str:
    """`value` as a string in postgresql.conf's syntax (a quote doubled)."""
    return "'" + value.replace("'", "''") + "'"


def _port_free(port: int) -> bool:
    """Whether the server could listen on 127.0.0.1:port: only a listener holds it."""
    with socket.socket() as s:
        # PostgreSQL binds with SO_REUSEADDR too, so the closing sockets of its own earlier
        # connections (TIME_WAIT, FIN_WAIT) do not keep it from the port.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_port(start: int = 54330) -> int:
    for port in range(start, start + 200):
        if _port_free(port):
            return port
    raise ConfigError("no free loopback port for the local cluster")


class LocalCluster:
    """A PostgreSQL cluster owned by this project folder, with an owner and an application role."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = home or default_home()
        self.state_file = self.home / "cluster.json"
        self.port_move: PortMove | None = None  # set by start() when the port had to change
        self._use(self._recorded_server_dir() or self.home)

    def _use(self, place: Path) -> None:
        """Keep the server's files (data, log, socket, pylib) in `place`."""
        self.server_dir = place
        self.data = place / "data"
        self.log_file = place / "postgres.log"
        self.pylib = place / "pylib"

    @property
    def relocated(self) -> bool:
        return self.server_dir != self.home

    def _recorded_server_dir(self) -> Path | None:
        try:
            value = json.loads(self.state_file.read_text()).get("server_dir")
        except (OSError, ValueError, AttributeError):
            return None
        return Path(value) if value else None

    def _private_place(self) -> Path:
        """This project's folder under the server root (one per $PYEMBED_HOME)."""
        return server_root() / hashlib.sha256(str(self.home).encode()).hexdigest()[:16]

    def _choose_place(self, os_user: str | None) -> Path:
        """$PYEMBED_HOME if the server's OS user can traverse it, else a private folder of
        that user under the server root (made here: root only ever runs the server as
        another user)."""
        if not os_user or self._as_server_user(["test", "-x", str(self.home)]).returncode == 0:
            return self.home
        root = server_root()
        root.mkdir(mode=0o711, parents=True, exist_ok=True)
        if root.stat().st_uid == 0:
            root.chmod(0o711)  # others may pass through, not list the projects
        place = self._private_place()
        place.mkdir(mode=0o700, exist_ok=True)
        place.chmod(0o700)
        self._chown(place, os_user)
        return place

    # -- state ---------------------------------------------------------------------------
    @property
    def initialised(self) -> bool:
        return self.state_file.exists() and (self.data / "PG_VERSION").exists()

    def state(self) -> ClusterState:
        if not self.initialised:
            raise DatabaseNotReady(f"no local cluster in {self.home}: run `pyembed db init`, "
                                   "or set PYEMBED_DSN to use your own database")
        return ClusterState(**json.loads(self.state_file.read_text()))

    @property
    def socket_dir(self) -> Path:
        run = self.server_dir / "run"
        if len(str(run)) > 80:  # Unix socket paths are limited to ~107 bytes
            import hashlib

            digest = hashlib.sha256(str(self.home).encode()).hexdigest()[:12]
            run = Path("/tmp") / f"pyembed-{digest}"
        return run

    def dsn(self, *, owner: bool = False, worker: bool = False) -> str:
        """The owner's, the worker's (WORKER_USER) or the application login's DSN."""
        st = self.state()
        if owner:
            user, pw = OWNER, st.owner_password
        elif worker:
            user, pw = WORKER_USER, st.worker_password or self._add_worker_login(st)
        else:
            user, pw = APP_USER, st.app_password
        return f"postgresql://{user}:{quote(pw)}@127.0.0.1:{st.port}/{DATABASE}"

    # -- commands ------------------------------------------------------------------------
    def _as_server_user(self, args: list[str], st: ClusterState | None = None,
                        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        os_user = st.os_user if st else self._os_user()
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
                    **(env or {})}
        cmd = args
        if os_user:
            cmd = ["runuser", "-u", os_user, "--", "env", *[f"{k}={v}" for k, v in full_env.items()],
                   *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd="/")

    @staticmethod
    def _os_user() -> str | None:
        """PostgreSQL refuses to run as root: as root, run it as the `postgres` OS user."""
        if os.geteuid() != 0:
            return None
        name = os.environ.get("PYEMBED_PG_OS_USER", "postgres")
        try:
            pwd.getpwnam(name)
        except KeyError:
            raise ConfigError(f"running as root needs an unprivileged OS user {name!r} for "
                              "PostgreSQL: run docker/install-host.sh or set PYEMBED_PG_OS_USER") from None
        return name

    def _chown(self, path: Path, os_user: str | None) -> None:
        if os_user:
            pw = pwd.getpwnam(os_user)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def init(self) -> bool:
        """Create the cluster (once); returns False when it already existed. One that fails part
        way is removed, so that the next init makes it whole."""
        if self.initialised:
            return False
        bindir = find_bindir()
        os_user = self._os_user()
        self.home.mkdir(parents=True, exist_ok=True)
        self._use(self._choose_place(os_user))
        if self.data.exists():
            shutil.rmtree(self.data)  # a half-made cluster from an interrupted init
        for d in (self.data, self.socket_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._chown(d, os_user)
        self.log_file.touch()
        self._chown(self.log_file, os_user)
        check = self._as_server_user(["test", "-w", str(self.data)])
        if check.returncode != 0:
            raise ConfigError(f"the OS user {os_user} cannot reach {self.data}: make its parent "
                              "folders traversable (chmod o+x) or set PYEMBED_HOME elsewhere")
        st = ClusterState(port=_free_port(), bindir=bindir, os_user=os_user,
                          owner_password=secrets.token_urlsafe(24),
                          app_password=secrets.token_urlsafe(24),
                          server_dir=str(self.server_dir) if self.relocated else None)
        pwfile = self.server_dir / ".pwfile"
        pwfile.write_text(st.owner_password + "\n")
        self._chown(pwfile, os_user)
        try:
            out = self._as_server_user(
                [f"{bindir}/initdb", "-D", str(self.data), "-U", OWNER, f"--pwfile={pwfile}",
                 "--auth=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"], st)
        finally:
            pwfile.unlink()
        if out.returncode != 0:
            raise ConfigError(f"initdb failed: {out.stderr.strip() or out.stdout.strip()}")
        settings = {**SERVER_SETTINGS, "port": str(st.port),
                    "unix_socket_directories": _quoted_setting(str(self.socket_dir))}
        with open(self.data / "postgresql.auto.conf", "a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in settings.items())
        self.state_file.write_text(json.dumps(asdict(st)))
        self.state_file.chmod(0o600)
        try:
            self.start()
            self._create_roles(self.state())  # start() moves the port if it was taken meanwhile
        except BaseException:
            # Half made (no database or roles), it would pass for made: the next init starts over.
            self._discard()
            raise
        return True

    def _discard(self) -> None:
        """Stop and remove a cluster an init left half made."""
        try:
            self.stop()
        except Exception as exc:  # the error being raised matters more: say this one too
            _log.warning("could not stop the half-made local cluster: %s", exc)
        self.state_file.unlink(missing_ok=True)
        shutil.rmtree(self.data, ignore_errors=True)

    def _create_roles(self, st: ClusterState) -> None:
        import psycopg
        from psycopg import sql

        from .passwords import password_clause

        admin = f"postgresql://{OWNER}:{quote(st.owner_password)}@127.0.0.1:{st.port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(DATABASE), sql.Identifier(OWNER)))
            # The owner is named like the schema: keep "$user" from putting its objects there.
            conn.execute(sql.SQL("ALTER ROLE {} SET search_path = public").format(
                sql.Identifier(OWNER)))
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(APP_GROUP)))
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN {} IN ROLE {}").format(
                sql.Identifier(APP_USER), password_clause(conn, APP_USER, st.app_password),
                sql.Identifier(APP_GROUP)))
        self._add_worker_login(st)

    def _add_worker_login(self, st: ClusterState) -> str:
        """Make WORKER_USER (in the application role, pyembed_worker and pyembed_operator) with a
        new password, recorded in cluster.json; returns the password. The application login
        stays out of both: any of its sessions could then count, and act for any tenant."""
        import psycopg
        from psycopg import sql

        from .passwords import password_clause

        if not self.running():
            raise DatabaseNotReady("the local cluster is not running: `pyembed db start` first")
        password = secrets.token_urlsafe(24)
        admin = f"postgresql://{OWNER}:{quote(st.owner_password)}@127.0.0.1:{st.port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn, conn.transaction():
            # Revision 0026 makes pyembed_worker too (in a database `pyembed install` reaches):
            # roles are the cluster's, so whichever comes first makes it.
            for group in (WORKER_GROUP, OPERATOR_GROUP):  # (0037 makes pyembed_operator)
                if conn.execute("SELECT FROM pg_catalog.pg_roles WHERE rolname = %s",
                                (group,)).fetchone() is None:
                    conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(group)))
            exists = conn.execute("SELECT FROM pg_catalog.pg_roles WHERE rolname = %s",
                                  (WORKER_USER,)).fetchone() is not None
            conn.execute(sql.SQL("{} ROLE {} LOGIN {}").format(
                sql.SQL("ALTER" if exists else "CREATE"), sql.Identifier(WORKER_USER),
                password_clause(conn, WORKER_USER, password)))
            conn.execute(sql.SQL("GRANT {}, {}, {} TO {}").format(
                sql.Identifier(APP_GROUP), sql.Identifier(WORKER_GROUP),
                sql.Identifier(OPERATOR_GROUP), sql.Identifier(WORKER_USER)))
        # Each corpus's partition grants its INSERT to each operator's login by name
        # (pyembed._partition_writers): a login made after the install is granted here.
        with psycopg.connect(admin.rsplit("/", 1)[0] + f"/{DATABASE}", autocommit=True) as conn:
            if conn.execute("SELECT to_regprocedure('pyembed._partition_writers(integer)')"
                            ).fetchone() not in (None, (None,)):
                conn.execute("SELECT pyembed._partition_writers(corpus_id) FROM pyembed.corpora")
        st.worker_password = password
        self.state_file.write_text(json.dumps(asdict(st)))
        return password

    def running(self) -> bool:
        if not self.initialised:
            return False
        st = self.state()
        out = self._as_server_user([f"{st.bindir}/pg_ctl", "status", "-D", str(self.data)], st)
        return out.returncode == 0

    def start(self) -> bool:
        """Start the server if it is not running; returns False when it already was."""
        st = self.state()
        if self.running():
            return False
        self.port_move = None
        if not _port_free(st.port):
            # Another program listens there (this cluster does not run): move to a free port.
            self.port_move = PortMove(st.port, _free_port(st.port + 1))
            self._set_port(st, self.port_move.new)
            _log.warning("%s", self.port_move)
        self.socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._chown(self.socket_dir, st.os_user)
        # A project folder moved or copied keeps its server's settings: the socket goes where
        # the folder is now (the old path failed the start on its lock file, or took the old
        # folder's socket while it still ran).
        self._set_conf({"unix_socket_directories": _quoted_setting(str(self.socket_dir))})
        self._link_package(st)
        env = {"PYTHONPATH": str(self.pylib), "OMP_NUM_THREADS": "1"}
        out = self._as_server_user(
            [f"{st.bindir}/pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data),
             "-l", str(self.log_file)], st, env)
        if out.returncode != 0:
            tail = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
            raise ConfigError(f"the local cluster did not start: {out.stderr.strip()}\n{tail}")
        return True

    def _link_package(self, st: ClusterState) -> None:
        """PL/Python imports the same pyembed code as this process: a link to it, or, when
        the server's OS user cannot read the package's folder, a copy made at each start."""
        self.pylib.mkdir(exist_ok=True)
        link = self.pylib / "pyembed"
        source = package_dir()
        if not st.os_user or self._as_server_user(
                ["test", "-r", str(source / "__init__.py")], st).returncode == 0:
            if not link.is_symlink() or link.resolve() != source:
                if link.is_dir() and not link.is_symlink():
                    shutil.rmtree(link)
                link.unlink(missing_ok=True)
                link.symlink_to(source, target_is_directory=True)
            return
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.exists():
            shutil.rmtree(link)
        shutil.copytree(source, link, ignore=shutil.ignore_patterns("__pycache__"))
        for path in (link, *link.rglob("*")):
            self._chown(path, st.os_user)

    def _set_port(self, st: ClusterState, port: int) -> None:
        self._set_conf({"port": str(port)})
        st.port = port
        self.state_file.write_text(json.dumps(asdict(st)))

    def _set_conf(self, settings: dict[str, str]) -> None:
        """These settings in postgresql.auto.conf, each on one line of its own."""
        conf = self.data / "postgresql.auto.conf"
        kept = [line for line in conf.read_text().splitlines(keepends=True)
                if line.split("=", 1)[0].strip() not in settings]
        conf.write_text("".join(kept) + "".join(f"{k} = {v}\n" for k, v in settings.items()))

    # -- streaming replicas on loopback -------------------------------------------------------
    def replica(self, name: str) -> LocalCluster:
        """The local replica `name` (made by add_replica), a cluster of its own."""
        if not REPLICA_NAME.fullmatch(name):
            raise InvalidInput(f"a replica name is 1-40 of a-z 0-9 _ -, not {name!r}")
        return LocalCluster(self.home / "replicas" / name)

    def replicas(self) -> list[str]:
        folder = self.home / "replicas"
        return sorted(p.name for p in folder.iterdir() if (p / "cluster.json").exists()) \
            if folder.is_dir() else []

    def add_replica(self, name: str) -> LocalCluster:
        """A hot standby of this cluster, streaming from it on loopback (pg_basebackup -R), on
        a port of its own; started."""
        replica = self.replica(name)
        if replica.initialised:
            raise ConfigError(f"replica {name} exists already ({replica.home})")
        st = self.state()
        if not self.running():
            raise DatabaseNotReady("the local cluster is not running: `pyembed db start` first")
        replica.home.mkdir(parents=True, exist_ok=True)
        replica._use(replica._choose_place(st.os_user))
        if replica.data.exists():
            shutil.rmtree(replica.data)  # a half-made copy from an interrupted add
        for d in (replica.data, replica.socket_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._chown(d, st.os_user)
        replica.log_file.touch()
        self._chown(replica.log_file, st.os_user)
        out = self._as_server_user(
            [f"{st.bindir}/pg_basebackup", "-D", str(replica.data), "-R", "-X", "stream",
             "-c", "fast", "-h", "127.0.0.1", "-p", str(st.port), "-U", OWNER, "-w"], st,
            {"PGPASSWORD": st.owner_password, "PGAPPNAME": name})
        if out.returncode != 0:
            raise ConfigError(f"pg_basebackup failed: {out.stderr.strip() or out.stdout.strip()}")
        rst = ClusterState(**{**asdict(st), "port": _free_port(st.port + 1),
                              "server_dir": str(replica.server_dir) if replica.relocated
                              else None})
        replica._set_conf({"port": str(rst.port),
                           "unix_socket_directories": _quoted_setting(str(replica.socket_dir))})
        replica.state_file.write_text(json.dumps(asdict(rst)))
        replica.state_file.chmod(0o600)
        replica.start()
        return replica

    def remove_replica(self, name: str) -> bool:
        """Stop the replica and delete its copy; False when there was none."""
        replica = self.replica(name)
        if not replica.initialised:
            return False
        replica.stop()
        if replica.relocated:
            shutil.rmtree(replica.server_dir)
        shutil.rmtree(replica.home)
        return True

    def replica_lag(self, name: str) -> dict[str, object]:
        """How far the replica is behind this cluster: WAL bytes not yet replayed, and for how
        long (0 when it has replayed everything: time since its last replayed transaction
        would grow while the primary is idle)."""
        import psycopg

        replica = self.replica(name)
        with psycopg.connect(self.dsn(owner=True), autocommit=True) as primary, \
                psycopg.connect(replica.dsn(owner=True), autocommit=True) as standby:
            lsn = primary.execute("SELECT pg_current_wal_lsn()").fetchone()
            row = standby.execute(
                "SELECT pg_wal_lsn_diff(%s, pg_last_wal_replay_lsn())::bigint, "
                "extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8",
                (lsn[0] if lsn else None,)).fetchone()
        assert row is not None
        behind = max(row[0] or 0, 0)
        return {"replica": name, "port": replica.state().port, "bytes_behind": behind,
                "seconds_behind": (row[1] or 0.0) if behind else 0.0}

    def stop(self) -> bool:
        """Stop the server; returns False when it was not running."""
        if not self.running():
            return False
        st = self.state()
        out = self._as_server_user(
            [f"{st.bindir}/pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.data)], st)
        if out.returncode != 0:
            raise ConfigError(f"pg_ctl stop failed: {out.stderr.strip()}")
        return True

    def status(self) -> dict[str, object]:
        if not self.initialised:
            return {"home": str(self.home), "initialised": False, "running": False,
                    "port": None, "socket_dir": None, "data": None, "log": None}
        st = self.state()
        return {"home": str(self.home), "initialised": True, "running": self.running(),
                "port": st.port, "socket_dir": str(self.socket_dir), "data": str(self.data),
                "log": str(self.log_file)}
