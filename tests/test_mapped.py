"""Zero-copy pulls (``pull(key, mmap=True)``): arrays mapped read-only from the cached file,
and the cache leaving a mapped file alone (in place, counted) until its arrays are gone, in
this process or another one. Both backends; other processes are real ones.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from reliability_helpers import assert_cache_consistent

from daman import Config, IntegrityError, Manager, NotMappedWarning
from daman import serialize as ser

MiB = 1024 * 1024


def mapped_from(array: np.ndarray, path: Path | None = None) -> bool:
    """Whether ``array``'s memory is a read-only mapping of a file (of ``path``)."""
    base = array
    while getattr(base, "base", None) is not None:
        base = base.base
        if isinstance(base, memoryview):
            base = base.obj
        if isinstance(base, mmap.mmap):
            return True
    return False


@dataclasses.dataclass
class Model:
    weights: np.ndarray
    name: str


def test_a_mapped_pull_reads_nothing_and_copies_nothing(manager: Manager) -> None:
    data = {
        "a": np.arange(4 * MiB // 8, dtype=np.int64),
        "nested": [np.ones((512, 512)), (np.zeros(1000, dtype=np.float32), "text")],
        "model": Model(np.linspace(0, 1, 100_000), "m"),
    }
    manager.push(data, "k", meta={"m": 1})
    for force in (False, True):  # a cache hit, and a download into the cache first
        got, meta = manager.pull("k", mmap=True, force=force)
        assert meta == {"m": 1}
        arrays = [got["a"], got["nested"][0], got["nested"][1][0], got["model"].weights]
        for array, expected in zip(
            arrays,
            [data["a"], data["nested"][0], data["nested"][1][0], data["model"].weights],
            strict=True,
        ):
            assert mapped_from(array) and not array.flags.writeable
            np.testing.assert_array_equal(array, expected)
        assert got["nested"][1][1] == "text" and got["model"].name == "m"
        with pytest.raises(ValueError, match="read-only"):
            got["a"][0] = 1
        writable = np.array(got["a"])  # what README says makes a writable copy
        writable[0] = 1
        del got, arrays


def test_a_dataframe_comes_back_mapped(manager: Manager) -> None:
    frame = pd.DataFrame({"x": np.arange(200_000), "y": np.random.default_rng(0).random(200_000)})
    manager.push(frame, "frame")
    got, _ = manager.pull("frame", mmap=True)
    pd.testing.assert_frame_equal(got, frame)
    assert mapped_from(got["y"].to_numpy())


def test_a_mapped_file_outlives_eviction_replacement_and_deletion(
    make_config, tmp_path: Path
) -> None:
    config = make_config(allocated_space=3 * MiB)
    with (
        Manager(config) as manager,
        Manager(config.replace(local_dir=str(tmp_path / "colleague"))) as colleague,
    ):
        manager.push(np.full(MiB // 8, 1.0), "k")  # ~1 MiB
        arrays, _ = manager.pull("k", mmap=True)
        path = manager.cache.get("k").path
        # Eviction: pushes that need the room pass the mapped entry over.
        for i in range(4):
            manager.push(np.full(MiB // 8, float(i)), f"other/{i}")
        assert manager.cache.get("k") is not None, "the mapped entry was evicted"
        assert [m.key for m in manager.mapped()] == ["k"]
        # Replacement: a colleague's new version goes to a new file; the old one stays.
        colleague.push(np.full(MiB // 8, 2.0), "k", force=True)
        new, _ = manager.pull("k")  # the next pull gets the new version
        assert new[0] == 2.0 and manager.cache.get("k").path != path
        assert path.exists() and arrays[0] == 1.0 and arrays.sum() == MiB // 8
        assert manager.mapped()[0].current is False  # kept as an older version
        used_while_mapped = manager.cache.usage().used
        # Deletion of the new version is allowed; the old mapped one still stays.
        manager.delete("k")
        assert path.exists() and arrays[-1] == 1.0
        # Once the arrays are gone, the old file goes (at the next reclaim) and stops counting.
        del arrays
        gc.collect()
        manager.cache.recover()
        assert not path.exists() and manager.mapped() == []
        assert manager.cache.usage().used < used_while_mapped


def test_an_unmapped_older_version_is_freed_by_the_next_eviction(make_config) -> None:
    """A version kept while mapped stops counting once its arrays are gone: the next push
    that needs the room frees it, without waiting for a process to open the cache again."""
    allocation = 3 * MiB + MiB // 2
    config = make_config(allocated_space=allocation)
    with Manager(config) as manager:
        manager.push(np.full(MiB // 8, 1.0), "k")
        arrays, _ = manager.pull("k", mmap=True)
        old = manager.cache.get("k").path
        manager.push(np.full(MiB // 8, 2.0), "k", force=True)  # the old one is retired
        assert old.exists() and manager.mapped()[0].current is False
        del arrays
        gc.collect()
        for i in range(2):  # 2 more MiB: they fit only once the retired MiB is freed
            manager.push(np.full(MiB // 8, float(i)), f"other/{i}")
        assert not old.exists() and manager.mapped() == []
        assert manager.cache.get("k") is not None  # freed before any entry was evicted
        assert_cache_consistent(manager, allocation)


MAP_AND_WAIT = """
    import json, sys
    import numpy as np
    from daman import Config, Manager
    config = Config(**json.loads(sys.argv[1]))
    manager = Manager(config)
    arrays, _ = manager.pull("k", mmap=True)
    assert float(arrays[0]) == 1.0
    print("mapped", flush=True)
    sys.stdin.readline()
    print(float(arrays.sum()), flush=True)
"""


def _mapper(config: Config) -> subprocess.Popen:
    code = textwrap.dedent(MAP_AND_WAIT)
    return subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(config.to_dict())],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_another_process_mapping_a_file_keeps_it_from_eviction(make_config) -> None:
    config = make_config(allocated_space=3 * MiB)
    with Manager(config) as manager:
        manager.push(np.full(MiB // 8, 1.0), "k")
    child = _mapper(config)
    try:
        assert child.stdout.readline() == "mapped\n", child.stderr.read()
        with Manager(config) as manager:
            path = manager.cache.get("k").path
            for i in range(5):
                manager.push(np.full(MiB // 8, float(i)), f"other/{i}")
            assert manager.cache.get("k") is not None and path.exists()
            assert manager.cache.usage().used <= 3 * MiB
        child.stdin.write("\n")
        child.stdin.flush()
        assert float(child.stdout.readline()) == MiB // 8
    finally:
        child.kill()
        child.communicate()


def test_a_killed_process_does_not_keep_its_mapping_forever(make_config) -> None:
    config = make_config(allocated_space=3 * MiB)
    with Manager(config) as manager:
        manager.push(np.full(MiB // 8, 1.0), "k")
    child = _mapper(config)
    assert child.stdout.readline() == "mapped\n", child.stderr.read()
    child.send_signal(signal.SIGKILL)
    child.communicate()
    with Manager(config) as manager:
        assert manager.mapped() == []
        for i in range(5):
            manager.push(np.full(MiB // 8, float(i)), f"other/{i}")
        assert manager.cache.get("k") is None  # evicted normally now


def test_mapped_pulls_in_a_fork_keep_the_file(make_config) -> None:
    """A forked child's arrays (inherited or its own) hold the file as the parent's do."""
    config = make_config(allocated_space=3 * MiB)
    with Manager(config) as manager:
        manager.push(np.full(MiB // 8, 1.0), "k")
        arrays, _ = manager.pull("k", mmap=True)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child keeps the inherited arrays; the parent drops its own
            os.close(write)
            os.read(read, 1)
            os._exit(0 if arrays[0] == 1.0 else 1)
        os.close(read)
        del arrays
        gc.collect()
        for i in range(4):
            manager.push(np.full(MiB // 8, float(i)), f"other/{i}")
        assert manager.cache.get("k") is not None  # the child still maps it
        os.write(write, b"x")
        os.close(write)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        assert manager.mapped() == []


def test_memory_only_and_objects_that_do_not_fit_fall_back_with_a_notice(
    make_config,
) -> None:
    with Manager(make_config(allocated_space=MiB)) as manager:
        manager.push(np.arange(10), "small")
        with pytest.warns(NotMappedWarning, match="memory_only"):
            got, _ = manager.pull("small", mmap=True, memory_only=True)
        assert not mapped_from(got) and got.flags.writeable
        big = np.arange(2 * MiB // 8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NotCachedWarning of the push
            manager.push(big, "big")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got, _ = manager.pull("big", mmap=True)
        np.testing.assert_array_equal(got, big)
        assert any(
            w.category is NotMappedWarning and "not in the local cache" in str(w.message)
            for w in caught
        ), [str(w.message) for w in caught]


def test_objects_without_buffers_load_as_usual(manager: Manager) -> None:
    manager.push({"plain": [1, 2, 3]}, "plain")
    assert manager.pull("plain", mmap=True)[0] == {"plain": [1, 2, 3]}
    assert manager.mapped() == []


def _rewrite_as_format_1(data: bytes) -> bytes:
    footer = ser.parse_footer(data, len(data))
    old = dataclasses.replace(
        footer, format=1, stream_sha256="", buffer_sha256=(), readonly=(), key="", code=None,
        libraries=(),
    )  # fmt: skip
    encoded = old.encode()
    return data[: footer.payload_size] + encoded + ser.TRAILER.pack(ser.MAGIC, len(encoded))


def test_format_1_objects_still_pull_mapped_and_not(manager: Manager) -> None:
    array = np.arange(300_000)
    src = manager.cache.tmp_dir / "v1.bin"
    src.write_bytes(_rewrite_as_format_1(ser.dump_to_bytes(array, "m", key="old")))
    manager.store.put("old", src, overwrite=True)
    src.unlink()
    for mapped in (False, True):
        got, meta = manager.pull("old", mmap=mapped, force=True)
        np.testing.assert_array_equal(got, array)
        assert meta == "m" and got.flags.writeable != mapped  # mapped: read-only


@pytest.fixture
def signed(make_config) -> Manager:
    with Manager(make_config(signing_key="team secret")) as manager:
        yield manager


def test_a_signed_mapped_hit_checks_the_stream_not_the_buffers(
    signed: Manager, tmp_path: Path
) -> None:
    """What can run code is checked before unpickling; the buffers, data only, are not read
    (README says so): a byte flipped in a buffer shows in verify(), not in the mapped hit."""
    array = np.arange(500_000, dtype=np.int64)
    signed.push({"a": array, "trap": _Trap(tmp_path / "trapped")}, "k")
    entry = signed.cache.get("k")
    footer = ser.parse_footer(entry.path.read_bytes(), entry.size)
    # A byte of the pickle stream changed in the cache: refused before unpickling, and the
    # copy is fetched again from the store.
    stream_byte = footer.stream[1] // 2
    _flip(entry.path, stream_byte)
    got, _ = signed.pull("k", mmap=True, force=False)
    np.testing.assert_array_equal(got["a"], array)
    assert signed.cache.get("k").path != entry.path  # the damaged copy was replaced
    del got
    # A byte of a buffer: the mapped hit does not read it...
    entry = signed.cache.get("k")
    buffer_byte = footer.buffers[0][0] + 8
    _flip(entry.path, buffer_byte)
    got, _ = signed.pull("k", mmap=True)
    assert got["a"][1] != 1  # the flipped value, mapped as it is on disc
    del got
    gc.collect()
    # ...verify() does.
    assert signed.verify().damaged == ["k"]


class _Trap:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (_sprung, (str(self.path),))


def _sprung(path: str) -> str:
    Path(path).touch()
    return "sprung"


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_tampered_stream_is_never_unpickled_on_a_mapped_hit(
    signed: Manager, tmp_path: Path
) -> None:
    marker = tmp_path / "trapped"
    signed.push({"a": np.arange(10_000), "trap": _Trap(marker)}, "k")
    marker.unlink(missing_ok=True)
    entry = signed.cache.get("k")
    footer = ser.parse_footer(entry.path.read_bytes(), entry.size)
    _flip(entry.path, 2)  # inside the stream: the object's first opcodes
    cached = ser.StoredFile(open(entry.path, "rb"))  # noqa: SIM115 - closed below
    try:
        with pytest.raises(IntegrityError, match="pickle stream"):
            cached.check_executable()
    finally:
        cached.f.close()
    assert footer.stream_sha256 and not marker.exists()


def test_dm_status_names_the_mapped_files(config: Config) -> None:
    from test_cli import configure, run

    import daman as dm

    assert configure(config).returncode == 0
    dm.push(np.arange(100_000), "k")
    arrays, _ = dm.pull("k", mmap=True)
    result = run("dm_status")
    assert "mapped:" in result.stdout and "k (" in result.stdout
    del arrays
