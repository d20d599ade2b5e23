"""A throwaway PostgreSQL server for the tests: a cluster in a temporary folder, started on
127.0.0.1 on a free port (as an unprivileged user when run as root: initdb refuses root)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator


class Unavailable(Exception):
    """No PostgreSQL server can be started here; the message says why."""


def _binaries() -> tuple[str, str]:
    for folder in [None, *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]:
        initdb = shutil.which("initdb", path=folder)
        pg_ctl = shutil.which("pg_ctl", path=folder)
        if initdb and pg_ctl:
            return initdb, pg_ctl
    raise Unavailable("PostgreSQL is not installed (no initdb/pg_ctl on PATH or in "
                      "/usr/lib/postgresql/*/bin); `.ci/run` installs it")


def _as_user() -> tuple[list[str], pwd.struct_passwd | None]:
    """The command prefix that runs the server as a user initdb accepts."""
    if os.geteuid() != 0:
        return [], None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            user = pwd.getpwnam(name)
            for tool in ("runuser", "setpriv"):
                if shutil.which(tool):
                    prefix = ["runuser", "-u", name, "--"] if tool == "runuser" else [
                        "setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                        "--clear-groups"]
                    return prefix, user
    raise Unavailable("running as root, and there is no postgres or nobody user and no "
                      "runuser/setpriv to start PostgreSQL as one (initdb refuses root)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server() -> Iterator[str]:
    """A running server; yields the URL of its ``postgres`` database (user ``ranksearch``)."""
    initdb, pg_ctl = _binaries()
    prefix, user = _as_user()
    root = tempfile.mkdtemp(prefix="ranksearch-pg-")
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
    data, port = os.path.join(root, "data"), _free_port()

    def run(*cmd: str) -> None:
        done = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120,
                              cwd=root)
        if done.returncode != 0:
            raise Unavailable(f"{os.path.basename(cmd[0])} failed: "
                              f"{(done.stderr or done.stdout).strip()[-400:]}")

    try:
        run(initdb, "-D", data, "-U", "ranksearch", "-A", "trust", "-E", "UTF8", "--no-sync")
        run(pg_ctl, "-D", data, "-l", os.path.join(root, "log"), "-w", "-t", "60", "-o",
            f"-p {port} -h 127.0.0.1 -k {root} -c fsync=off -c max_connections=200", "start")
    except Unavailable:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        yield f"postgresql://ranksearch@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", data, "-m", "immediate", "stop"],
                       capture_output=True, timeout=60, cwd=root)
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(url: str) -> str:
    """A new, empty database on the server of ``url``; returns its URL."""
    import psycopg2

    name = f"rs_{uuid.uuid4().hex[:12]}"
    conn = psycopg2.connect(url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
    finally:
        conn.close()
    return url.rsplit("/", 1)[0] + f"/{name}"
