#!/usr/bin/env python
"""Quality against the step budget (issue 27): one curve from the reports of
``bench/class_quality.py`` runs at several budgets.

Each ``STEPS=FOLDER`` names a finished ``class_quality.py --budget STEPS ... --report`` folder
(its ``report.json``: mean and standard deviation over seeds per method), or an
``inner_quality.py`` one; ``STEPS=FILE.json`` a named report, and ``#METHOD`` after either
reads that method instead of ``--method`` (a report whose method had another name then). Writes a plot of
held-out KID and FID against the steps (error bars: one standard deviation over seeds) and
prints a markdown table with judge top-1.

  python bench/budget_curve.py 60=out_bench/budget/b60 120=out_bench/budget/b120 \\
      240=out_bench/budget/b240 600=out_bench/budget/b600 --method toolkit \\
      --out docs/budget_curve.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after the backend)

KEYS = [("judge_top1", "judge top-1", 2), ("kid_heldout", "KID held-out ↓", 4),
        ("fid_heldout", "FID held-out ↓", 1)]


def read(entries: list[str], method: str) -> list[tuple[int, dict]]:
    rows = []
    for entry in entries:
        steps, sep, where = entry.partition("=")
        if not sep or not steps.isdigit():
            raise SystemExit(f"{entry!r} is not STEPS=FOLDER (e.g. 240=out_bench/budget/b240)")
        where, _, name = where.partition("#")
        name = name or method
        path = Path(where) if where.endswith(".json") else Path(where) / "report.json"
        if not path.is_file():
            raise SystemExit(f"{path} does not exist: run the benchmark's --report there first")
        report = json.loads(path.read_text())
        if name not in report:
            raise SystemExit(f"{path} has no method {name!r}; it has {', '.join(report)}")
        rows.append((int(steps), report[name]))
    return sorted(rows, key=lambda r: r[0])


def table(rows: list[tuple[int, dict]]) -> str:
    lines = ["| steps | " + " | ".join(label for _, label, _ in KEYS) + " |",
             "|---|" + "---|" * len(KEYS)]
    for steps, row in rows:
        cells = [f"{row[k][0]:.{d}f} ± {row[k][1]:.{d}f}" for k, _, d in KEYS]
        lines.append(f"| {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[tuple[int, dict]], out: Path, title: str) -> None:
    steps = [s for s, _ in rows]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, (key, label) in zip(axes, [("kid_heldout", "KID held-out"),
                                       ("fid_heldout", "FID held-out")]):
        ax.errorbar(steps, [r[key][0] for _, r in rows], yerr=[r[key][1] for _, r in rows],
                    marker="o", capsize=3)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(steps)
        ax.set_xticklabels([str(s) for s in steps])
        ax.set_xlabel("optimisation steps")
        ax.set_ylabel(label + " (lower is better)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="STEPS=FOLDER (or FILE.json) of a report, "
                        "optionally #METHOD")
    parser.add_argument("--method", default="toolkit")
    parser.add_argument("--title", default="class mode, EfficientNet-Lite0, 10 imagenette "
                        "classes, held-out photos (mean ± sd over seeds)")
    parser.add_argument("--out", default="out_bench/budget/budget_curve.png")
    args = parser.parse_args(argv)
    rows = read(args.folders, args.method)
    plot(rows, Path(args.out), args.title)
    print(table(rows))
    print(args.out)


if __name__ == "__main__":
    main()
