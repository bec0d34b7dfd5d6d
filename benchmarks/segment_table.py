"""Perplexity per segment from `streamattn stream` CSVs, as a Markdown table (for the README).

python benchmarks/segment_table.py runs/eval100k/tokens.csv runs/eval100k_w512/tokens.csv --segment 8192
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

from streamattn.eval import segment_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="+", type=Path)
    parser.add_argument("--segment", type=int, default=8192)
    args = parser.parse_args()
    rows: dict[str, list[list[float]]] = defaultdict(lambda: [[], [], [], []])
    for path in args.csv:
        with path.open() as f:
            for row in csv.DictReader(f):
                columns = rows[row["policy"]]
                for i, key in enumerate(("position", "nll", "ms_per_token", "rss_mb")):
                    columns[i].append(float(row[key]) if key != "position" else int(row[key]))
    per_policy = {policy: segment_stats(*columns, size=args.segment) for policy, columns in rows.items()}
    overall = {policy: segment_stats(*columns, size=2**62) for policy, columns in rows.items()}  # one segment: all
    segments = sorted({s for stats in per_policy.values() for s in stats})
    heads = [f"{s // 1024}K-{(s + args.segment) // 1024}K" for s in segments]
    print("| policy | " + " | ".join(heads) + " | all |")
    print("|---|" + "---|" * (len(heads) + 1))
    for policy, stats in per_policy.items():
        cells = [f"{stats[s][0]:.1f}" if s in stats else "-" for s in segments]
        print(f"| {policy} | " + " | ".join(cells) + f" | {overall[policy][0][0]:.2f} |")


if __name__ == "__main__":
    main()
