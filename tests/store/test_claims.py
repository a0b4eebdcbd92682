"""Two drivers sharing one store compute each missing result once.

Claims (:mod:`asyncflow.claims`) are leases in the store's index: a driver
claims a key before it runs the task, and a second driver finding the claim
waits for the result.  Here two real driver processes race on one store, and
a SIGKILLed claim holder is taken over at once by the driver left.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from asyncflow.claims import TTL, ClaimResult
from asyncflow.store import ResultStore, journal_mode

pytestmark = pytest.mark.timeout(180)

DRIVER = """
import asyncio, os, sys, time
from asyncflow import WorkflowEngine

store, log, go, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


def square(i):
    with open(log, "a") as f:
        f.write(f"square {i}\\n")
    time.sleep(float(os.environ.get("HOLD", "0.02")))
    return i * i


def total(*values):
    with open(log, "a") as f:
        f.write("total\\n")
    return sum(values)


async def main():
    while not os.path.exists(go):  # both drivers start their work together
        await asyncio.sleep(0.005)
    async with WorkflowEngine(store=store) as flow:
        sq = flow.function_task(square)
        print(await flow.function_task(total)(*[sq(i) for i in range(n)]))


asyncio.run(main())
"""


def _driver(tmp_path: Path, n: int, **env: str) -> subprocess.Popen[str]:
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER))
    argv = [sys.executable, str(script), str(tmp_path / "store")]
    argv += [str(tmp_path / "ran.log"), str(tmp_path / "go"), str(n)]
    with (tmp_path / f"stderr.{time.monotonic_ns()}").open("w") as err:
        return subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ, **env},
        )


def test_a_claim_is_held_released_and_cleared_by_the_result(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    mine, theirs = store.claims("h:1:a"), store.claims("h:1:b")
    assert mine.claim("k") is ClaimResult.MINE
    assert theirs.claim("k") is ClaimResult.HELD and theirs.held("k")
    mine.release("k")
    assert theirs.claim("k") is ClaimResult.MINE and not theirs.held("k")
    store.put("k", "task", 1)
    assert mine.claim("k") is ClaimResult.STORED and not mine.held("k")


def test_a_dead_or_silent_owner_loses_its_claims(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    import socket

    dead = store.claims(f"{socket.gethostname()}:{gone.stdout.strip()}:x")
    assert dead.claim("k") is ClaimResult.MINE
    me = store.claims("other-host:1:y")
    assert me.claim("k") is ClaimResult.MINE, "its pid is gone on this host"
    silent = store.claims("far-away-host:1:z")
    assert silent.claim("j") is ClaimResult.MINE
    assert me.claim("j") is ClaimResult.HELD, "another host's lease still runs"
    with store._db() as db:
        db.execute("UPDATE claims SET expires = ?", (time.time() - 1,))
    assert me.claim("j") is ClaimResult.MINE, "an expired lease is ignored"
    assert TTL >= 30, "leases outlive a busy login node's pauses"


def test_two_drivers_racing_on_one_store_run_each_task_once(tmp_path: Path) -> None:
    n = 40
    drivers = [_driver(tmp_path, n) for _ in range(2)]
    time.sleep(0.5)  # both imported asyncflow; the go file starts them at once
    (tmp_path / "go").touch()
    outs = [d.communicate(timeout=120)[0] for d in drivers]
    errs = [log.read_text()[-3000:] for log in sorted(tmp_path.glob("stderr.*"))]
    assert [d.returncode for d in drivers] == [0, 0], errs
    expected = sum(i * i for i in range(n))
    assert [o.split() for o in outs] == [[str(expected)]] * 2
    ran = Counter((tmp_path / "ran.log").read_text().splitlines())
    twice = {task: count for task, count in ran.items() if count > 1}
    assert not twice, f"run by both drivers: {twice}"
    assert len(ran) == n + 1
    assert (
        not ResultStore(tmp_path / "store")
        ._db()
        .execute("SELECT * FROM claims")
        .fetchall()
    ), "no claim outlives its drivers"


def test_a_killed_claim_holder_is_taken_over_at_once(tmp_path: Path) -> None:
    (tmp_path / "go").touch()
    holder = _driver(tmp_path, 1, HOLD="300")
    log = tmp_path / "ran.log"
    deadline = time.monotonic() + 60
    while not (log.exists() and log.read_text()):
        assert time.monotonic() < deadline and holder.poll() is None
        time.sleep(0.05)
    second = _driver(tmp_path, 1, HOLD="0")
    try:
        time.sleep(3.0)
        assert second.poll() is None, "it waits for the holder's result"
        holder.send_signal(signal.SIGKILL)
        out, _ = second.communicate(timeout=60)
    finally:
        for d in (holder, second):
            d.kill()
            d.communicate()
    assert out.split() == ["0"] and second.returncode == 0
    assert log.read_text().splitlines() == ["square 0", "square 0", "total"]


def test_a_store_on_a_network_filesystem_does_not_use_wal() -> None:
    mounts = (
        "/dev/sda1 / ext4 rw 0 0\n"
        "mds@tcp:/scratch /lus/scratch lustre rw 0 0\n"
        "server:/home /home nfs4 rw 0 0\n"
        "tmpfs /home/me/tmp tmpfs rw 0 0\n"
    )
    assert journal_mode(Path("/lus/scratch/me/store"), mounts) == "DELETE"
    assert journal_mode(Path("/home/me/store"), mounts) == "DELETE"
    assert journal_mode(Path("/home/me/tmp/store"), mounts) == "WAL"
    assert journal_mode(Path("/lus/scratchy"), mounts) == "WAL"
    assert journal_mode(Path("/work"), "") == "WAL"


def test_a_store_opens_while_another_driver_is_writing_to_it(tmp_path: Path) -> None:
    # SQLite refuses a journal-mode change at once while another connection
    # writes, where other locks wait: two drivers opening a new store together
    # met exactly that
    writer = sqlite3.connect(
        tmp_path / "index.sqlite", isolation_level=None, check_same_thread=False
    )
    writer.execute("CREATE TABLE held (x)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO held VALUES (1)")
    opened: list[ResultStore] = []
    opener = threading.Thread(target=lambda: opened.append(ResultStore(tmp_path)))
    opener.start()
    opener.join(0.3)  # time to meet the writer's lock
    assert opener.is_alive() and not opened  # waiting for the writer, not failed
    writer.execute("COMMIT")
    opener.join(30)
    assert opened and opened[0].put("k", "t", 1) and opened[0].get("k") == 1
