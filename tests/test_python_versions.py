"""Two Python versions on one store: a real interpreter of another minor version (made by
``tests/system/install.py`` under ``build/other-python``) pushes and pulls next to this one.

Plain data (dicts, numpy arrays) crosses versions both ways. Code pickled by value (a lambda,
a function or class defined in ``__main__``) is refused before unpickling with one line that
names both versions and the way out; allowed explicitly, it loads with a warning.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from daman import Config, DeserializationError, Manager, VersionMismatchWarning

ROOT = Path(__file__).resolve().parent.parent
OTHER = ROOT / "build" / "other-python" / "bin" / "python"


@pytest.fixture(scope="module")
def other_python() -> str:
    if not OTHER.exists():
        pytest.fail(
            f"{OTHER} is missing: run `python tests/system/install.py` (README's test command "
            "does) to make a virtual environment of another Python minor version"
        )
    version = subprocess.run(
        [str(OTHER), "-c", "import sys; print(sys.version.split()[0])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert version.split(".")[:2] != sys.version.split()[0].split(".")[:2]
    return version


def run_there(config: Config, code: str) -> str:
    script = "import json, sys\nfrom daman import Config, Manager\n"
    script += "config = Config(**json.loads(sys.argv[1]))\n" + textwrap.dedent(code)
    result = subprocess.run(
        [str(OTHER), "-c", script, json.dumps(config.to_dict())],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def shared(tmp_path: Path) -> Config:
    store = tmp_path / "store"
    store.mkdir()
    return Config(
        storage_name=str(store), service="local", local_dir=str(tmp_path / "here"), progress=False
    )


def test_data_crosses_python_versions_both_ways(other_python: str, shared: Config) -> None:
    there = shared.replace(local_dir=str(Path(shared.local_dir).parent / "there"))
    run_there(
        there,
        """
        import numpy as np
        with Manager(config) as m:
            m.push({"rows": [1, 2.5, "x"], "array": np.arange(6).reshape(2, 3)}, "from/there",
                   meta={"python": sys.version})
        """,
    )
    with Manager(shared) as here:
        obj, meta = here.pull("from/there")
        assert meta["python"].split()[0] == other_python
        assert obj["rows"] == [1, 2.5, "x"]
        np.testing.assert_array_equal(obj["array"], np.arange(6).reshape(2, 3))
        here.push({"array": np.ones(4), "text": "from here"}, "from/here")
    out = run_there(
        there,
        """
        with Manager(config) as m:
            obj, _ = m.pull("from/here")
            print(obj["text"], obj["array"].sum())
        """,
    )
    assert out.split() == ["from", "here", "4.0"]


def test_code_from_another_python_is_refused_cleanly(other_python: str, shared: Config) -> None:
    there = shared.replace(local_dir=str(Path(shared.local_dir).parent / "there"))
    run_there(
        there,
        """
        class Model:
            def predict(self, x):
                return x * 2

        def scale(x):
            return x * 3

        with Manager(config) as m:
            m.push(lambda x: x + 1, "code/lambda")
            m.push(scale, "code/function")
            m.push(Model(), "code/instance")
            m.push({"model": Model(), "weights": [1, 2]}, "code/inside-data")
        """,
    )
    with Manager(shared) as here:
        for key in ("code/lambda", "code/function", "code/instance", "code/inside-data"):
            with pytest.raises(DeserializationError) as caught:
                here.pull(key)
            message = str(caught.value)
            assert f"Python {other_python}" in message, message
            assert sys.version.split()[0] in message and "allow_version_mismatch" in message
            assert here.info(key).holds_code is True
        # Pushed again from this Python, it loads.
        here.push(lambda x: x + 1, "code/lambda", force=True)
        function, _ = here.pull("code/lambda")
        assert function(1) == 2


def test_allowed_code_from_another_python_loads_with_a_warning(
    other_python: str, shared: Config
) -> None:
    """The escape hatch, on code simple enough to survive (a lambda returning a constant)."""
    there = shared.replace(local_dir=str(Path(shared.local_dir).parent / "there"))
    run_there(
        there,
        """
        with Manager(config) as m:
            m.push(lambda: "ok", "code/simple")
        """,
    )
    with Manager(shared) as here, pytest.warns(VersionMismatchWarning, match=other_python):
        function, _ = here.pull("code/simple", allow_version_mismatch=True)
    assert callable(function)
