"""Superseded by ``bench/run.py``; kept as a shortcut to its large-array section.

    python bench/roundtrip.py [run.py options]  ==  python bench/run.py --only large [...]

Push / pull (not cached) / pull (cached) of a 256 MiB array through daman against raw boto3 +
pickle, measured in the same run; the report goes to bench/RESULTS-partial.md.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    run = Path(__file__).with_name("run.py")
    sys.argv = [str(run), "--only", "large", *sys.argv[1:]]
    sys.path.insert(0, str(run.parent))
    runpy.run_path(str(run), run_name="__main__")
