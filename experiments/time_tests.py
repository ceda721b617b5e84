"""Times the README's test command and records it (the README's test-time figure comes from here).

    python experiments/time_tests.py --json experiments/results/test_suite.json

Runs ``python -m pytest -n 2 tests`` (pytest's addopts print every test and the 15 slowest items),
streams its output, and writes the wall time, the counts, the slowest item and the load average
before and after, with the usual provenance. Run it on an otherwise idle machine: the figure is
only as idle as the machine was (the load averages say how idle).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ling_jax.provenance import Provenance  # noqa: E402

COMMAND = [sys.executable, "-m", "pytest", "-n", "2", "tests"]
_SUMMARY = re.compile(r"=+ (.*) in ([\d.]+)s")
_DURATION = re.compile(r"^([\d.]+)s (call|setup|teardown)\s+(\S+)")


def parse(output: str) -> dict:
    """Counts, pytest's own time and the slowest item from a pytest run's output."""
    counts = {}
    summary = [m for m in _SUMMARY.finditer(output)]
    if summary:
        for part in summary[-1].group(1).split(","):
            n, _, what = part.strip().partition(" ")
            if n.isdigit():
                counts[what.strip()] = int(n)
    slowest = [(float(m.group(1)), m.group(2), m.group(3)) for line in output.splitlines()
               for m in [_DURATION.match(line.strip())] if m]
    top = max(slowest, default=(float("nan"), "", ""))
    return {"passed": counts.get("passed", 0), "failed": counts.get("failed", 0), "errors": counts.get("error", 0),
            "skipped": counts.get("skipped", 0), "pytest_s": float(summary[-1].group(2)) if summary else None,
            "slowest_item": f"{top[2]} ({top[1]})", "slowest_s": top[0]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="experiments/results/test_suite.json")
    a = p.parse_args(argv)
    prov = Provenance("experiments/time_tests.py", argv)
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(COMMAND, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
    rc = proc.wait()
    wall = time.perf_counter() - start
    result = {"test_command": "python -m pytest -n 2 tests", "returncode": rc, "suite_wall_s": round(wall, 1),
              "load_average_1min_start": load_start, "load_average_1min_end": os.getloadavg()[0],
              **parse("".join(lines))}
    prov.write(a.json, result, indent=1)
    print(f"suite: {result['passed']} passed, {result['failed']} failed in {wall / 60:.1f} min "
          f"(slowest {result['slowest_item']}, {result['slowest_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
