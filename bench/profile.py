"""Summarise py-spy ``--format raw`` output (collapsed stacks): where the samples went.

``python -m bench.profile FILE [--top N]`` prints the functions with the most samples on
top of the stack (self) and anywhere in it (inclusive), as shares of all samples.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

# py-spy frames look like "function (path/to/module.py:123)"; drop the line number.
FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^:]*)(?::\d+)?\)$")


def short(frame: str) -> str:
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "/ntorque/", "/bench/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['fn']} ({path})"


def summarise(path: Path, top: int) -> str:
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [short(f) for f in stack.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread (")]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    lines = [f"{path.name}: {total} samples"]
    for title, counts in (("self", self_counts), ("inclusive", inclusive)):
        lines.append(f"  top {top} by {title}:")
        for name, count in counts.most_common(top):
            lines.append(f"    {100 * count / max(total, 1):5.1f}%  {name}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    for path in args.files:
        print(summarise(path, args.top))


if __name__ == "__main__":
    main()
