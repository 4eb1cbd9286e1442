"""``python -m equidiff.report DIR [DIR ...]``: the metrics.json of several runs side by side."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v[:4]) + (", ..." if len(v) > 4 else "") + "]"
    return str(v)


def table(dirs: list[Path], keys: list[str] | None = None) -> str:
    """A markdown table: one row per metric, one column per run folder."""
    runs = []
    for d in dirs:
        path = Path(d) / "metrics.json"
        if not path.exists():
            raise SystemExit(f"equidiff.report: no metrics.json in {d}")
        runs.append(json.loads(path.read_text()))
    keys = keys or sorted(set().union(*runs), key=lambda k: (isinstance(runs[0].get(k), list), k))
    lines = ["| metric | " + " | ".join(Path(d).name for d in dirs) + " |",
             "| --- |" + " --- |" * len(dirs)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_fmt(r.get(k, "")) for r in runs) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("dirs", nargs="+", type=Path, help="run folders (paths.output_dir) holding metrics.json")
    ap.add_argument("--keys", nargs="*", help="only these metrics")
    args = ap.parse_args(argv)
    print(table(args.dirs, args.keys))


if __name__ == "__main__":
    main()
