"""Ctrl-C in the middle of daman's calls, in a process that goes on (a notebook, a REPL):
every interruption comes out as ``KeyboardInterrupt``, and the next call works.

The interruptions are real SIGINTs, sent at random moments to a child process, because
pytest handles ``KeyboardInterrupt`` in its own process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from daman.serialize import PrefixHasher

_PULLS_AND_PUSHES = textwrap.dedent(
    """
    import os, random, signal, sqlite3, sys, threading, time, traceback, warnings
    from pathlib import Path
    import numpy as np
    from daman import Config, Manager

    warnings.simplefilter("ignore")
    base, trials = Path(sys.argv[1]), int(sys.argv[2])
    (base / "store").mkdir(parents=True)
    m = Manager(Config(storage_name=str(base / "store"), service="local",
                       local_dir=str(base / "cache"), progress=False))
    obj = np.arange(1000.0)
    m.push(obj, "k")
    rng = random.Random(0)
    interrupted = 0

    def interrupt(after):
        time.sleep(after)
        os.kill(os.getpid(), signal.SIGINT)

    for trial in range(trials):
        timer = threading.Thread(target=interrupt, args=(rng.uniform(0, 0.004),))
        try:
            if trial % 2:
                m.delete("k", local=True, remote=False)
                timer.start()
                m.pull("k")  # a download, kept in the cache
            else:
                timer.start()
                m.push(obj, "k", force=True)
        except KeyboardInterrupt:
            interrupted += 1
        except BaseException:
            print(f"trial {trial}: Ctrl-C came out as another error:", flush=True)
            traceback.print_exc(file=sys.stdout)
            sys.exit(1)
        while timer.is_alive():
            try:
                timer.join()
            except KeyboardInterrupt:
                pass
        try:
            assert (m.pull("k")[0] == obj).all(), "the next pull"
        except KeyboardInterrupt:  # the interruption came after the call
            assert (m.pull("k")[0] == obj).all(), "the next pull"
        other = sqlite3.connect(base / "cache" / "index.sqlite3", timeout=2)  # another process
        other.execute("BEGIN IMMEDIATE")  # 'database is locked' if a write was left open
        other.execute("ROLLBACK")
        other.close()
    assert m.verify().ok
    m.close()
    print("interrupted", interrupted, sorted(os.listdir(base / "cache" / "tmp")))
    """
)


def test_ctrl_c_at_any_moment_of_a_pull_or_push_leaves_daman_working(tmp_path: Path) -> None:
    """1,500 pulls and pushes, each interrupted at a random moment of its first 4 ms: each
    interruption is a KeyboardInterrupt (before: one in a few hundred came out as a
    LocalFileError, 'Bad file descriptor', from a descriptor closed twice); the next call
    works; no write transaction is left holding the index (before: every later write failed
    and other processes waited); no temp file is left."""
    run = subprocess.run(
        [sys.executable, "-c", _PULLS_AND_PUSHES, str(tmp_path / "work"), "1500"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    _, interrupted, left = run.stdout.strip().splitlines()[-1].split(" ", 2)
    assert int(interrupted) > 200  # the interruptions did land inside the calls
    assert left == "[]"


_PARTS_INTERRUPTED_TWICE = textwrap.dedent(
    """
    import os, signal, threading, time
    from daman.store._transfer import Parts, new_pool

    def part(stop):
        while not stop.is_set():
            time.sleep(0.005)
        time.sleep(0.3)  # a chunk in flight when told to stop
        return 1

    def interrupt_twice():
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)  # while waiting for the parts
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)  # while the parts are being stopped

    parts = Parts(new_pool(), [part] * 4)
    threading.Thread(target=interrupt_twice).start()
    try:
        parts.wait()
    except KeyboardInterrupt:
        pass
    print("running after the call:", sum(not f.done() for f in parts.futures))
    """
)


def test_a_second_ctrl_c_still_waits_for_the_parts_to_end() -> None:
    """A transfer interrupted twice: the call returns only once every part has ended (they
    read or write the caller's file, which is closed next). Before, the second Ctrl-C left
    parts running, writing to a closed descriptor or to whatever file reused its number."""
    run = subprocess.run(
        [sys.executable, "-c", _PARTS_INTERRUPTED_TWICE], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "running after the call: 0"


def test_stopping_a_hasher_whose_thread_never_started(tmp_path: Path) -> None:
    """A Ctrl-C between making the hashing thread and starting it: stopping the hasher
    (as every download does in its cleanup) raises nothing that would hide the interrupt."""
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    with open(path, "rb") as f:
        hasher = PrefixHasher(f.fileno())
        hasher._thread = threading.Thread(target=lambda: None)  # made, never started
        hasher.close()  # before: RuntimeError, cannot join thread before it is started
