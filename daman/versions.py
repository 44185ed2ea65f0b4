"""Which Python and libraries wrote an object, and what that means for loading it here.

Plain data (dicts, arrays, DataFrames) crosses Python versions; code pickled by value
(functions, lambdas, classes defined in ``__main__`` or a notebook) runs only under the
Python minor version that wrote it (another one can crash the interpreter: ``SystemError:
unknown opcode``, a segfault on ``repr``). A push records the versions of the main data
libraries it finds loaded, so that an unpickling failure can say what to install.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from typing import TYPE_CHECKING, Any

import cloudpickle

from .errors import DeserializationError, VersionMismatchWarning, warn

if TYPE_CHECKING:
    from .serialize import Footer

CODE_MARK = b"cloudpickle"
"""In a pickle stream, the sign of code pickled by value: cloudpickle's own functions rebuild
it, so the stream names the module; plain data never does."""

LIBRARIES = ("numpy", "pandas", "pyarrow", "polars", "scipy", "sklearn", "torch", "xarray")
"""Libraries whose versions a push records when they are loaded (never imported for it)."""


def library_versions(obj: Any) -> tuple[tuple[str, str], ...]:
    names = {*LIBRARIES, type(obj).__module__.partition(".")[0]} - {"builtins", "__main__"}
    found = []
    for name in sorted(names):
        version = getattr(sys.modules.get(name), "__version__", None)
        if isinstance(version, str):
            found.append((name, version))
    return tuple(found)


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def version_problem(footer: Footer) -> str | None:
    """A sentence describing a writer/reader version gap that can break loading code pickled
    by value, or None."""
    here_py = sys.version.split()[0]
    if footer.python == here_py and footer.cloudpickle == cloudpickle.__version__:
        return None  # written here, or by the same versions: most objects, every cache hit
    gaps = []
    if _minor(footer.python) != _minor(here_py):
        gaps.append(f"Python {footer.python} (here {here_py})")
    if _minor(footer.cloudpickle) != _minor(cloudpickle.__version__):
        gaps.append(f"cloudpickle {footer.cloudpickle} (here {cloudpickle.__version__})")
    if not gaps:
        return None
    return "written with " + " and ".join(gaps)


def check_code(
    footer: Footer, data: bytes | bytearray, what: str, *, allow_version_mismatch: bool
) -> None:
    """Before unpickling ``data`` (the stream or the meta): refuse code pickled by value under
    another Python minor version, which can crash this interpreter (``SystemError: unknown
    opcode``, a segfault on ``repr``), unless explicitly allowed; warn when allowed, or when
    only cloudpickle's version differs. Plain data crosses versions and passes silently."""
    problem = version_problem(footer)
    if problem is None:
        return
    if what == "the object" and footer.code is not None:
        holds_code = footer.code
    else:  # written before the flag existed, or the meta: look (memchr speed)
        holds_code = CODE_MARK in data
    if not holds_code:
        return
    same_python = _minor(footer.python) == _minor(sys.version.split()[0])
    if not same_python and not allow_version_mismatch:
        raise DeserializationError(
            f"refusing to load {what}: it holds code (functions or classes pickled by value) "
            f"{problem}, and code from another Python version can crash this interpreter. "
            f"Push it again from Python {_minor(sys.version.split()[0])}, or push data rather "
            "than code (import functions from a module); to load it anyway pass "
            "allow_version_mismatch=True."
        )
    warn(
        f"{what} holds code pickled by value {problem}; it may not load or may behave "
        "differently. Match the writer's versions if it fails.",
        VersionMismatchWarning,
    )


_MAX_DETAIL = 200
_MODULE_IN_MESSAGE = re.compile(r"<module '([\w.]+)'")


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 1] + "…"


def _local_version(module: str) -> str | None:
    loaded = getattr(sys.modules.get(module), "__version__", None)
    if isinstance(loaded, str):
        return loaded
    try:
        return importlib.metadata.version(module)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def describe_failure(exc: BaseException, footer: Footer, what: str) -> str:
    """A short message for an unpickling failure: the error (cut short: a pandas mismatch can
    print a whole column), the module involved and its versions there and here."""
    module = getattr(exc, "name", None) if isinstance(exc, ImportError) else None
    if module is None:
        found = _MODULE_IN_MESSAGE.search(str(exc))
        module = found[1] if found else None
    written = dict(footer.libraries)
    hint = "Install the modules it needs in the versions that wrote it"
    if module:
        top = module.partition(".")[0]
        there, here = written.get(top), _local_version(top)
        if there and there != here:
            hint = (
                f"It was written with {top} {there} (here {here or 'not installed'}): "
                f"install {top}=={there}"
            )
        elif here is None:
            hint = f"It needs {top}, which is not installed here: install it"
    problem = version_problem(footer)
    also = f"; it was {problem}" if problem else ""
    detail = f"{type(exc).__name__}: {_short(str(exc))}"
    return f"{what} could not be unpickled ({detail}). {hint}{also}."
