"""Combine the per-run ``metrics.json`` files of ``repro cdeq-mnist`` (one row, some seeds
each) into one table: mean ± sample sd over all seeds of a row, as the repro's own table does.

    python notes/issue-20-aggregate.py notes/issue-20-s4-authors-*-metrics.json
"""

import json
import statistics
import sys
from collections import defaultdict

ROWS = ("vanilla", "jacreg", "skip", "skipreg")
KEYS = (
    ("test_accuracy", 100.0, "test acc %"),
    ("test_nfe_authors", 1.0, "test NFE (authors' count)"),
    ("test_nfe", 1.0, "test NFE (ours)"),
    ("train_cpu_seconds_per_epoch", 1.0, "train CPU s/epoch"),
    ("predict_seconds_per_batch", 1000.0, "predict ms/batch"),
)


def main(paths):
    per_row = defaultdict(lambda: defaultdict(list))
    seeds = defaultdict(list)
    for path in paths:
        m = json.load(open(path))
        for row in ROWS:
            if f"{row}_test_accuracy_seeds" not in m:
                continue
            seeds[row] += [int(s) for s in str(m["seeds"]).split(",")]
            for key, scale, _ in KEYS:
                per_row[row][key] += [scale * v for v in m[f"{row}_{key}_seeds"]]
    print("| model | seeds | " + " | ".join(label for _, _, label in KEYS) + " |")
    print("|---|---|" + "---|" * len(KEYS))
    for row in ROWS:
        if row not in per_row:
            continue
        cells = []
        for key, _, _ in KEYS:
            v = per_row[row][key]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.3f} ± {sd:.3f}")
        print(f"| {row} | {','.join(map(str, sorted(seeds[row])))} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
