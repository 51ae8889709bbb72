"""The report's plots, from results the benchmarks wrote with --json:

python bench/server_overhead.py --json bench/results/server_overhead.json
python bench/accuracy.py --json bench/results/accuracy.json
python bench/report_plots.py      # -> docs/img/latency_vs_concurrency.png, accuracy_by_format.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]


def latency_plot(results: dict, target: Path) -> None:
    rows = results["concurrency"]
    clients = [row["clients"] for row in rows]
    figure, latency = plt.subplots(figsize=(6, 4))
    latency.plot(clients, [row["p50_ms"] for row in rows], "o-", label="p50 latency")
    latency.plot(clients, [row["p99_ms"] for row in rows], "s--", label="p99 latency")
    latency.set_xscale("log", base=2)
    latency.set_xticks(clients, [str(c) for c in clients])
    latency.set_xlabel("concurrent clients (batch-1 requests)")
    latency.set_ylabel("client-observed latency (ms)")
    rate = latency.twinx()
    rate.plot(clients, [row["requests_per_s"] for row in rows], "^:", color="grey",
              label="throughput")  # fmt: skip
    rate.set_ylabel("requests / s")
    handles = latency.get_legend_handles_labels()[0] + rate.get_legend_handles_labels()[0]
    latency.legend(handles, [h.get_label() for h in handles], loc="upper left")
    latency.set_title("fpgaserve: ResNet-50 pipeline, instant device stand-in")
    figure.tight_layout()
    figure.savefig(target, dpi=120)


def accuracy_plot(results: dict, target: Path) -> None:
    rows = results["rows"]
    names = [row["path"] for row in rows]
    figure, axis = plt.subplots(figsize=(7, 4))
    positions = range(len(rows))
    axis.bar([p - 0.2 for p in positions], [100 * r["top1"] for r in rows], 0.4, label="top-1")
    axis.bar([p + 0.2 for p in positions], [100 * r["top5"] for r in rows], 0.4, label="top-5")
    axis.set_xticks(list(positions), names, rotation=30, ha="right")
    axis.set_ylabel("accuracy (%)")
    axis.set_ylim(0, 100)
    axis.set_title(f"MobileNet 0.75 on {results['photos']} ImageNet photos, per format")
    axis.legend()
    figure.tight_layout()
    figure.savefig(target, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    server = json.loads((args.results / "server_overhead.json").read_text())
    accuracy = json.loads((args.results / "accuracy.json").read_text())
    latency_plot(server, args.out / "latency_vs_concurrency.png")
    accuracy_plot(accuracy, args.out / "accuracy_by_format.png")
    print(
        f"wrote {args.out / 'latency_vs_concurrency.png'} and {args.out / 'accuracy_by_format.png'}"
    )


if __name__ == "__main__":
    main()
