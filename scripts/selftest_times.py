"""How fast a campaign catches each planted bug, over several seeds (docs/selftest.md).

One campaign per seed over every planted implementation (identical cases for
all targets of a seed). For each broken one: the case at which it was first
caught, per seed, then the minimum, median and maximum over the seeds and in
how many seeds it was caught at all; for each correct one, its failures.

    python scripts/selftest_times.py --examples 40 --seeds 0-9 --jobs 2
"""

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

from flashcheck.verify.campaign import CampaignConfig, run_campaign
from flashcheck.verify.planted import BROKEN, CORRECT, MULTI_TILE


def one_seed(seed: int, examples: int) -> dict:
    """{"seconds", "cases", "first": {bug: case number}, "correct_failures": {name: count}}."""
    targets = [f"flashcheck.verify.planted:{n}" for n in (*BROKEN, *CORRECT)]
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as out:
        result = run_campaign(CampaignConfig(targets=targets, max_examples=examples, seed=seed,
                                             isolate=False, progress=False, out=out))
    order = list(dict.fromkeys(r["case_id"] for r in result.rows))
    first = {}
    for row in result.rows:
        name = row["target"].split(":")[1]
        if row["verdict"] == "fail" and name in BROKEN and name not in first:
            first[name] = order.index(row["case_id"]) + 1
    fails = {n: sum(r["verdict"] == "fail" for r in result.rows if r["target"].endswith(f":{n}")) for n in CORRECT}
    return {"seconds": time.monotonic() - start, "cases": result.cases, "first": first, "correct_failures": fails}


def seeds_of(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=40)
    ap.add_argument("--seeds", default="0-9", help="a seed or a range, e.g. 0-9")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    seeds = seeds_of(args.seeds)
    with ProcessPoolExecutor(args.jobs) as pool:
        runs = dict(zip(seeds, pool.map(one_seed, seeds, [args.examples] * len(seeds))))
    print(f"{args.examples} cases per seed, seeds {seeds[0]}-{seeds[-1]}, "
          f"{len(BROKEN) + len(CORRECT)} targets; wall time per seed "
          f"{min(r['seconds'] for r in runs.values()):.0f}-{max(r['seconds'] for r in runs.values()):.0f} s\n")
    print("| planted bug | caught in seeds | cases to catch: min | median | max | per seed |")
    print("|---|--:|--:|--:|--:|---|")
    for bug in BROKEN:
        hits = [runs[s]["first"][bug] for s in seeds if bug in runs[s]["first"]]
        per_seed = " ".join(str(runs[s]["first"].get(bug, "-")) for s in seeds)
        name = f"{bug} (multi-tile)" if bug in MULTI_TILE else bug
        if hits:
            print(f"| {name} | {len(hits)}/{len(seeds)} | {min(hits)} | {statistics.median(hits):g} | "
                  f"{max(hits)} | {per_seed} |")
        else:
            print(f"| {name} | 0/{len(seeds)} | | | | {per_seed} |")
    for name in CORRECT:
        total = sum(runs[s]["correct_failures"][name] for s in seeds)
        print(f"\n{name}: {total} failing runs over {len(seeds)} seeds")


if __name__ == "__main__":
    main()
