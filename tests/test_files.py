"""daman/files.py: writing files whole, and temp files opened for writing."""

from __future__ import annotations

import os
from pathlib import Path

from daman.files import open_empty


def test_open_empty_creates_empties_and_keeps_the_inode(tmp_path: Path) -> None:
    """A temp file is written through the file ``Cache.temp_file`` made (the same inode,
    which that file's lock covers), emptied when a download starts over, made when asked
    for a new path."""
    made = tmp_path / "new"
    with open_empty(made) as f:
        f.write(b"abc")
    assert made.read_bytes() == b"abc"
    inode = made.stat().st_ino
    with open_empty(made) as f:  # a download starting over
        f.write(b"z")
    assert made.read_bytes() == b"z" and made.stat().st_ino == inode
    empty = tmp_path / "empty"
    empty.touch()
    with open_empty(empty, buffering=1 << 20) as f:
        f.write(b"x" * 10)
        assert f.tell() == 10
    assert empty.read_bytes() == b"x" * 10 and os.stat(empty).st_size == 10
