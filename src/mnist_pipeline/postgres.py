"""A private PostgreSQL cluster in one folder, for the tracking server's stores: password
(scram) logins only, TCP on 127.0.0.1 without a unix socket, started and stopped with pg_ctl
and found again by its PID file.

PostgreSQL refuses to run as root, so as root its programs run as the user `postgres`, which
must be able to reach the folder.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import PipelineError
from .processes import log_tail, read_pid, write_private

DB_USER = "mlflow"
OS_USER = "postgres"


class PostgresError(PipelineError):
    """PostgreSQL cannot be found, set up, started, stopped or logged in to."""


@dataclass(frozen=True)
class Cluster:
    """A cluster's data folder and its server's log."""

    data: Path
    log: Path


def find_program(name: str) -> Path:
    """A PostgreSQL server program: on PATH, else in Debian's /usr/lib/postgresql/*/bin."""
    found = shutil.which(name)
    if found:
        return Path(found)
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if candidates:
        return candidates[-1]
    raise PostgresError(f"PostgreSQL's `{name}` was not found: install the PostgreSQL server "
                        "(Debian/Ubuntu: apt-get install postgresql; macOS: brew install "
                        "postgresql)")


def as_owner(cmd: list[str]) -> list[str]:
    """`cmd`, run as the user `postgres` when this process is root (PostgreSQL refuses root)."""
    return ["runuser", "-u", OS_USER, "--", *cmd] if os.geteuid() == 0 else cmd


def hand_to_owner(*paths: Path) -> None:
    """As root: give `paths` to the user `postgres` and check it can reach them."""
    if os.geteuid() != 0:
        return
    try:
        owner = pwd.getpwnam(OS_USER)
    except KeyError:
        raise PostgresError("running as root, PostgreSQL needs the system user `postgres` "
                            "(created by the postgresql package)") from None
    for path in paths:
        os.chown(path, owner.pw_uid, owner.pw_gid)
    for path in paths:
        if subprocess.run(as_owner(["test", "-w", str(path)])).returncode != 0:
            closed = next((p for p in reversed(path.parents) if not os.stat(p).st_mode & 0o001),
                          path.parent)
            raise PostgresError(f"the user `postgres` cannot reach {path}: {closed} is closed "
                                f"to other users. Run `chmod o+x {closed}` or choose a --dir "
                                "under a folder open to others (e.g. /srv or /tmp)")


def run_tool(cmd: list[str], cluster: Cluster, what: str) -> None:
    done = subprocess.run(as_owner(cmd), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise PostgresError(f"{what} failed: {' '.join(detail)}; {log_tail(cluster.log)}")


def init(cluster: Cluster, password: str, port: int) -> None:
    """A new cluster in `cluster.data` (which must not exist), its superuser DB_USER with
    `password`, listening on 127.0.0.1:`port`. The password passes to initdb in a file (0600,
    removed after) beside `cluster.data`, whose parent folder should be private."""
    cluster.data.mkdir(mode=0o700)
    cluster.log.touch(mode=0o600)
    pwfile = cluster.data.parent / ".pwfile"
    write_private(pwfile, password + "\n")
    try:
        hand_to_owner(cluster.data, cluster.log, pwfile)
        run_tool([str(find_program("initdb")), "-D", str(cluster.data), "-U", DB_USER,
                  f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8", "--locale=C"],
                 cluster, "initdb")
    except BaseException:
        shutil.rmtree(cluster.data, ignore_errors=True)  # so that the next start begins anew
        raise
    finally:
        pwfile.unlink(missing_ok=True)
    with open(cluster.data / "postgresql.conf", "a") as conf:
        conf.write(f"\n# mnist-pipeline server\nlisten_addresses = '127.0.0.1'\nport = {port}\n"
                   "unix_socket_directories = ''\n")


def initialised(cluster: Cluster) -> bool:
    return (cluster.data / "PG_VERSION").is_file()


def running_pid(cluster: Cluster) -> int | None:
    """The PID of the cluster's running server, if one runs."""
    # postmaster.pid's second line is the data folder, not a start time: the process is
    # recognised by its command line, `postgres -D <this cluster's folder>`, as pg_ctl starts it
    return read_pid(cluster.data / "postmaster.pid", f"postgres\0-D\0{cluster.data}\0")


def start(cluster: Cluster) -> None:
    if running_pid(cluster) is not None:
        return
    run_tool([str(find_program("pg_ctl")), "-D", str(cluster.data), "-l", str(cluster.log),
              "-w", "-t", "60", "start"], cluster, "starting PostgreSQL")


def stop(cluster: Cluster) -> bool:
    """Stop the cluster's server (fast shutdown); False if it was not running."""
    if running_pid(cluster) is None:
        return False
    run_tool([str(find_program("pg_ctl")), "-D", str(cluster.data), "-m", "fast", "-w", "-t",
              "60", "stop"], cluster, "stopping PostgreSQL")
    return True


def database_uri(password: str, port: int, database: str) -> str:
    """SQLAlchemy's URI of `database` on the cluster at 127.0.0.1:`port`, as DB_USER."""
    # an explicit driver: SQLAlchemy 2 maps plain postgresql:// to psycopg 3
    return f"postgresql+psycopg2://{DB_USER}:{password}@127.0.0.1:{port}/{database}"


def create_databases(password: str, port: int, names: tuple[str, ...]) -> None:
    """Create each database of `names` that the cluster at 127.0.0.1:`port` lacks."""
    import psycopg2

    try:
        conn = psycopg2.connect(host="127.0.0.1", port=port, user=DB_USER, password=password,
                                dbname="postgres")
    except psycopg2.OperationalError as exc:
        raise PostgresError(f"cannot log in to PostgreSQL on 127.0.0.1:{port}: "
                            f"{str(exc).strip().splitlines()[0]}") from None
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database")
            existing = {row[0] for row in cur.fetchall()}
            for name in names:
                if name not in existing:
                    cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
