"""python -m tests.fuzz: run the corpus (see tests/fuzz/__init__.py)."""

from __future__ import annotations

import os

# Before torch is imported: one intra-op thread, so a forked child never inherits an OpenMP team.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HYBRID_NUM_THREADS", "1")

import argparse  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    p.add_argument("--cases", type=int, default=80, help="cases in all, spread evenly over the areas (default 80)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--area", action="append", default=None, help="only this area (repeatable)")
    p.add_argument("--index", type=int, default=None, help="only this case index (with --area)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a case may take (default 60)")
    p.add_argument("--memory-mb", type=int, default=1024,
                   help="address space a case may add to the parent's (default 1024 MiB)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every case, not only failures")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # odd-but-legal configs warn; the verdict is what counts
    from tests.fuzz.areas import AREAS, make_seeds
    from tests.fuzz.harness import run_case

    areas = args.area or list(AREAS)
    unknown = [a for a in areas if a not in AREAS]
    if unknown:
        p.error(f"unknown area(s) {', '.join(unknown)} (areas: {', '.join(AREAS)})")
    with tempfile.TemporaryDirectory(prefix="hybrid-fuzz-") as tmp:
        t0 = time.monotonic()
        seeds = make_seeds(Path(tmp))
        print(f"seeds ready in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        per_area = max(1, args.cases // len(areas))
        indices = [args.index] if args.index is not None else range(per_area)
        verdicts: dict[str, Counter] = {a: Counter() for a in areas}
        failures = []
        t0 = time.monotonic()
        for i in indices:
            for area in areas:
                rng = random.Random(f"{args.seed}:{area}:{i}")
                case, accept, must_name = AREAS[area](seeds, rng, i)
                o = run_case(area, i, case, accept, must_name, args.timeout, args.memory_mb << 20)
                verdicts[area][o.verdict] += 1
                if o.verdict == "FAILED":
                    failures.append(o)
                if args.verbose or o.verdict == "FAILED":
                    print(f"{o.verdict:8s} {area}#{i} ({o.seconds:.2f} s): {o.detail}", flush=True)
        took = time.monotonic() - t0
    total = sum(sum(c.values()) for c in verdicts.values())
    print(f"{total} cases in {took:.0f} s, seed {args.seed}:")
    for area, c in verdicts.items():
        print(f"  {area:7s} {sum(c.values()):6d}  ok {c['ok']:6d}  refused {c['refused']:6d}  FAILED {c['FAILED']}")
    for o in failures:
        print(f"reproduce: python -m tests.fuzz --area {o.area} --index {o.index} --seed {args.seed} -v")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
