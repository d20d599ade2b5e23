"""Stores that fail: each gives its real cause, a non-zero exit, and keeps what was stored."""

import contextlib
import multiprocessing
import os
import pwd
import sqlite3
import subprocess
import tempfile

import pytest
import torch

import ranksearch
from ranksearch.cli import main
from ranksearch.errors import StoreError
from ranksearch.evaluate import Evaluator, ProxySettings
from ranksearch.executors import DONE
from ranksearch.models import build_model
from ranksearch.pareto import parse_objectives
from ranksearch.store import Store, read_study

OBJECTIVES = parse_objectives(("accuracy", "flops"))
PROXY = ProxySettings(steps=0, eval_batches=1)


@pytest.fixture(scope="module")
def evaluator(digits):
    torch.manual_seed(0)
    return Evaluator(build_model("digits-cnn"), digits, PROXY)


def fill(url, evaluator, fractions=(0.2, 0.4, 0.6)):
    """A store holding one result per fraction; returns the results."""
    store = Store(url, "s", evaluator.space, OBJECTIVES)
    results = [evaluator(evaluator.space.uniform(f)) for f in fractions]
    for r in results:
        store.save(r)
    store.release()
    return results


def checkpoint(path):
    """Move the write-ahead log into the file, as a finished process leaves it."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


class DeleteAfter:
    """Drives a search in this process and deletes the store file after ``n`` results."""

    def __init__(self, path, n):
        self.path, self.n = path, n

    def drive(self, loop, evaluate):
        done = 0
        while (work := loop.propose()) is not DONE:
            loop.finish(evaluate(work.config, partial=work.partial))
            done += 1
            if done == self.n:
                os.remove(self.path)


def test_store_deleted_mid_search_stops_the_search(digits, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "ranksearch.db"
    with pytest.raises(StoreError, match="was deleted while the search ran") as caught:
        ranksearch.search(build_model("digits-cnn"), digits, strategy="random", evaluations=8,
                          out=str(tmp_path), proxy=PROXY, executor=DeleteAfter(path, 3))
    assert "3 results it held" in str(caught.value)
    assert not path.exists()  # nothing recreated it behind the user's back


@pytest.fixture
def tmpfs():
    """A 1 MiB tmpfs (skips where this process cannot mount one)."""
    folder = tempfile.mkdtemp(prefix="ranksearch-full-")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", folder],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        os.rmdir(folder)
        pytest.skip(f"cannot mount a small tmpfs to fill: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", folder], capture_output=True)
    os.rmdir(folder)


def test_disk_full_names_the_disk_and_keeps_what_was_stored(evaluator, tmpfs):
    url = f"sqlite:///{tmpfs}/ranksearch.db"
    kept = fill(url, evaluator)
    store = Store(url, "s", evaluator.space, OBJECTIVES)
    filler = os.path.join(tmpfs, "filler")
    with contextlib.suppress(OSError), open(filler, "wb") as f:
        while True:
            f.write(b"\0" * 4096)
            f.flush()
    with pytest.raises(StoreError, match="is full") as caught:
        for f in (0.3, 0.5, 0.7, 0.8, 0.9):
            store.claim(evaluator.space.uniform(f))
            store.save(evaluator(evaluator.space.uniform(f)))
    assert "database or disk is full" in str(caught.value)
    assert "Traceback" not in str(caught.value) and len(str(caught.value)) < 400
    os.remove(filler)
    assert read_study(url, "s")[0][:3] == kept


def test_garbage_in_the_file_is_named_damage_and_report_exits_non_zero(evaluator, tmp_path,
                                                                      capsys):
    path = tmp_path / "ranksearch.db"
    fill(f"sqlite:///{path}", evaluator, fractions=[0.05 * i for i in range(1, 20)])
    checkpoint(path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2 // 4096 * 4096)
        f.write(os.urandom(8192))
    with pytest.raises(StoreError, match="is damaged"):
        Store(f"sqlite:///{path}", "s", evaluator.space, OBJECTIVES)
    assert main(["report", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is damaged" in err and "Traceback" not in err and len(err.splitlines()) <= 2


def test_zero_byte_store_is_refused_not_taken_for_a_new_one(evaluator, tmp_path, capsys):
    path = tmp_path / "ranksearch.db"
    fill(f"sqlite:///{path}", evaluator)
    checkpoint(path)
    os.truncate(path, 0)
    with pytest.raises(StoreError, match=r"is empty \(0 bytes\)"):
        Store(f"sqlite:///{path}", "s", evaluator.space, OBJECTIVES)
    assert path.stat().st_size == 0  # left as it was
    assert main(["report", "--out", str(tmp_path)]) == 2
    assert "is empty (0 bytes)" in capsys.readouterr().err


def _open_read_only(url, space, answers):
    """In a child: drop root (root writes any file), then try to store a result."""
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
    try:
        store = Store(url, "s", space, OBJECTIVES)
        store.claim(space.uniform(0.9))
        answers.put("no error")
    except StoreError as e:
        answers.put(str(e))


def test_read_only_store_file_is_named(evaluator):
    folder = tempfile.mkdtemp(prefix="ranksearch-ro-")
    try:
        os.chmod(folder, 0o777)
        path = os.path.join(folder, "ranksearch.db")
        kept = fill(f"sqlite:///{path}", evaluator)
        checkpoint(path)
        os.chmod(path, 0o444)
        fork = multiprocessing.get_context("fork")
        answers = fork.Queue()
        child = fork.Process(target=_open_read_only,
                             args=(f"sqlite:///{path}", evaluator.space, answers))
        child.start()
        child.join(60)
        message = answers.get(timeout=5)
        assert "is read-only" in message and path in message, message
        assert read_study(f"sqlite:///{path}", "s")[0] == kept
    finally:
        subprocess.run(["rm", "-rf", folder])
