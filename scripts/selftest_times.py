"""How fast a campaign catches each planted bug (docs/selftest.md).

One campaign over every planted implementation (identical cases for all);
for each broken one, the first failing case: its number, the wall time since
the campaign started, its classes and the reason.

    PYTHONPATH=. python scripts/selftest_times.py --examples 40
"""

import argparse
import tempfile
import time

from flashcheck.reports import records
from flashcheck.verify.campaign import CampaignConfig, run_campaign
from flashcheck.verify.planted import BROKEN, CORRECT


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    stamps = []
    original = records.CaseWriter.write

    def write(self, row):
        stamps.append((time.monotonic(), row))
        return original(self, row)

    records.CaseWriter.write = write
    targets = [f"flashcheck.verify.planted:{n}" for n in (*BROKEN, *CORRECT)]
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as out:
        result = run_campaign(CampaignConfig(targets=targets, max_examples=args.examples, seed=args.seed,
                                             isolate=False, progress=False, out=out))
    total = time.monotonic() - start
    print(f"{result.cases} cases x {len(targets)} targets in {total:.1f} s (seed {args.seed})\n")
    print("| planted bug | caught at case | after (s) | magnitude | mask | layout | reason |")
    print("|---|--:|--:|---|---|---|---|")
    seen = {}
    for i, (t, row) in enumerate(stamps):
        name = row["target"].split(":")[1]
        seen.setdefault(name, []).append(row)
        if row["verdict"] == "fail" and name in BROKEN and not any(r.get("_first") for r in seen[name][:-1]):
            row["_first"] = True
            reason = (row["reason"] or "").replace("|", "/")[:70]
            print(f"| {name} | {i // len(targets) + 1} | {t - start:.2f} | {row['magnitude']} | {row['mask_kind']} "
                  f"| {row['layout']} | {reason} |")
    for name in BROKEN:
        if not any(r.get("_first") for r in seen.get(name, [])):
            print(f"| {name} | not caught | | | | | |")
    for name in CORRECT:
        fails = sum(r["verdict"] == "fail" for r in seen[name])
        print(f"\n{name}: {len(seen[name])} runs, {fails} failures")


if __name__ == "__main__":
    main()
