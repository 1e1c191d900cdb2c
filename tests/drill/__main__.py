"""`make drill`: run every drill, print one table, exit non-zero if any case failed.

python -m tests.drill [--quick] [--only NAME ...] [--out runs/drill]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

from tests.conftest import start_local_ray
from tests.drill.case import Row, table
from tests.drill.registry import all_drills


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.drill", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the drills CI runs (no slow faults)")
    parser.add_argument("--only", nargs="*", default=None, help="drill names to run")
    parser.add_argument("--out", default="runs/drill", help="folder for table.md and each drill's scratch")
    args = parser.parse_args(argv)

    drills = [d for d in all_drills() if not (args.quick and d.slow) and (not args.only or d.name in args.only)]
    out = Path(args.out).resolve()  # drills run commands in other folders: scratch paths must be absolute
    out.mkdir(parents=True, exist_ok=True)
    if any(d.needs_ray for d in drills):
        start_local_ray()
    rows: list[Row] = []
    for drill in drills:
        started = time.monotonic()
        print(f"drill {drill.name} ({drill.group}) ...", flush=True)
        scratch = Path(tempfile.mkdtemp(prefix=f"{drill.name}-", dir=out))
        try:
            found = drill.run(scratch)
        except Exception as err:  # noqa: BLE001 - a drill that breaks is a failed case, and the table goes on
            traceback.print_exc()
            found = [Row(drill.name, "-", "the drill runs", f"drill raised {type(err).__name__}: {err}", False)]
        rows += found
        failed, seconds = sum(not r.passed for r in found), time.monotonic() - started
        print(f"drill {drill.name}: {len(found)} cases, {failed} failed, {seconds:.0f} s", flush=True)
    text = table(rows)
    (out / "table.md").write_text(text)
    print("\n" + text)
    failed = [r.case for r in rows if not r.passed]
    print(f"{len(rows)} cases, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
