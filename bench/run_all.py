"""Run every benchmark in this folder, one after another, with this interpreter.

Each benchmark prints its own figures next to a baseline measured in the same run (a naive
Python set for the classifier, bare mitmdump for the proxy, the parser alone for the import).
They are measurements, not tests: run them on a quiet machine and read the ratios.

    python bench/run_all.py            # all of them (tens of minutes: the 5M-entry list)
    python bench/run_all.py store proxy
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["classify", "store", "proxy", "import", "report", "sensor"]


def main(names: list[str]) -> int:
    status = 0
    for name in names or ORDER:
        script = HERE / f"bench_{name}.py"
        print(f"\n===== {script.name} =====", flush=True)
        status |= subprocess.call([sys.executable, str(script)])
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
