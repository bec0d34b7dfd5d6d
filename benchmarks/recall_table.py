"""Recall results of several `streamattn recall` runs (their recall.csv) as one Markdown table.

python benchmarks/recall_table.py runs/recall_compression_smollm2/*/recall.csv
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

from streamattn.eval.recall import format_bytes, format_distance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="+", type=Path)
    args = parser.parse_args()
    cells: dict[str, dict[int, list[tuple[bool, bool]]]] = defaultdict(lambda: defaultdict(list))
    kv: dict[str, int] = defaultdict(int)
    order: list[str] = []
    for path in args.csv:
        with path.open() as f:
            for row in csv.DictReader(f):
                policy = row["policy"]
                if policy not in cells:
                    order.append(policy)
                cells[policy][int(row["distance"])].append((row["correct_rank"] == "True", row["exact"] == "True"))
                kv[policy] = max(kv[policy], int(row["kv_bytes"]))
    distances = sorted({d for per in cells.values() for d in per})
    head = ["policy", "KV bytes", *[format_distance(d) for d in distances]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * len(distances)) + "|"]
    for policy in order:
        row = [f"`{policy}`", format_bytes(kv[policy])]
        for d in distances:
            hits = cells[policy].get(d)
            if not hits:
                row.append("n/a")
                continue
            n = len(hits)
            row.append(f"{sum(r for r, _ in hits) / n:.2f} {sum(e for _, e in hits) / n:.2f} ({n})")
        lines.append("| " + " | ".join(row) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
