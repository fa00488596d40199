"""The results of `benchmarks/run.py` as one Markdown table, for docs/performance.md:

    python -m benchmarks.report bench-results > table.md

One row per comparison: dmstab's side and the reference side with their medians, the ratio
(below 1: dmstab faster), the target and whether it held; then the machine, torch and date of
each benchmark's run, read from its JSON file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.run import BENCHMARKS


def _seconds(value: float) -> str:
    return f"{value * 1e3:,.1f} ms" if value < 10 else f"{value:,.1f} s"


def _side(comparison: dict[str, Any], name: str) -> dict[str, Any]:
    return next(side for side in comparison["sides"] if side["name"] == name)


def rows(record: dict[str, Any]) -> list[str]:
    lines = []
    for comparison in record["comparisons"]:
        ours = _side(comparison, comparison["subject"])
        theirs = _side(comparison, comparison["baseline"])
        verdict = {True: "met", False: "**missed**", None: ""}[comparison["met"]]
        lines.append(
            f"| {comparison['title']} | {ours['name']}: {_seconds(ours['median_s'])} "
            f"| {theirs['name']}: {_seconds(theirs['median_s'])} | {comparison['ratio']:.3f} "
            f"| {comparison['target']} | {verdict} |"
        )
    return lines


def markdown(folder: Path) -> str:
    records = [
        json.loads((folder / f"{name}.json").read_text())
        for name in BENCHMARKS
        if (folder / f"{name}.json").is_file()
    ]
    if not records:
        raise SystemExit(f"no benchmark results in {folder} (run python -m benchmarks.run)")
    lines = [
        "| comparison | dmstab (median) | reference (median) | ratio | target | |",
        "| --- | --- | --- | ---: | --- | --- |",
    ]
    for record in records:
        lines += rows(record)
    lines.append("")
    for record in records:
        env = record["environment"]
        device = record["comparisons"][0]["device"] if record["comparisons"] else "?"
        lines.append(
            f"- `{record['benchmark']}`: {device}, torch {env['torch']}, {env['date']}, "
            f"{record['wall_s']:.0f} s"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, nargs="?", default=Path("bench-results"))
    print(markdown(parser.parse_args().folder), end="")


if __name__ == "__main__":
    main()
