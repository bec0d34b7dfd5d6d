"""Perplexity per segment from `streamattn stream` CSVs, as a Markdown table (for the README).

python benchmarks/segment_table.py runs/eval100k/tokens.csv runs/eval100k_w512/tokens.csv --segment 8192
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="+", type=Path)
    parser.add_argument("--segment", type=int, default=8192)
    args = parser.parse_args()
    sums: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in args.csv:
        with path.open() as f:
            for row in csv.DictReader(f):
                nll = float(row["nll"])
                if not math.isnan(nll):
                    sums[row["policy"]][int(row["position"]) // args.segment].append(nll)
    segments = sorted({s for per in sums.values() for s in per})
    heads = [f"{s * args.segment // 1024}K-{(s + 1) * args.segment // 1024}K" for s in segments]
    print("| policy | " + " | ".join(heads) + " | all |")
    print("|---|" + "---|" * (len(heads) + 1))
    for policy, per in sums.items():
        cells = [f"{math.exp(sum(per[s]) / len(per[s])):.1f}" if per.get(s) else "-" for s in segments]
        everything = [x for s in per for x in per[s]]
        print(f"| {policy} | " + " | ".join(cells) + f" | {math.exp(sum(everything) / len(everything)):.2f} |")


if __name__ == "__main__":
    main()
