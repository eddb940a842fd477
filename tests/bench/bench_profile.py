"""Optional py-spy profiles of gateway workers during a measured run (--profile SCENARIO[,...]): collapsed
stacks plus a short table of where the samples are, by own time and by inclusive time."""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
from pathlib import Path

RATE_HZ = 200


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def start(pid: int, seconds: float, out: Path, cpus: str) -> subprocess.Popen[bytes] | None:
    """py-spy record (non-blocking: the worker is never paused) of pid for seconds, collapsed stacks to out."""
    binary = py_spy()
    if binary is None:
        return None
    return subprocess.Popen(
        ["taskset", "-c", cpus, binary, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
         "--rate", str(RATE_HZ), "--nonblocking", "--function", "--format", "raw", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)


def summarize(raw: Path, top: int = 20) -> list[str]:
    """Markdown: the frames with the most own samples and the most inclusive samples."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short(f) for f in stack.split(";") if f]
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return ["(no samples)"]
    # the frames every sample passes through (module, runner, event loop entry) say nothing
    for frame in [f for f, c in inclusive.items() if c >= 0.9 * total]:
        del inclusive[frame]
    lines = [f"{total} samples at {RATE_HZ} Hz.", "",
             "| own % | frame | | inclusive % | frame |", "|---|---|---|---|---|"]
    for (f1, c1), (f2, c2) in zip(own.most_common(top), inclusive.most_common(top), strict=False):
        lines.append(f"| {100 * c1 / total:.1f} | `{f1}` | | {100 * c2 / total:.1f} | `{f2}` |")
    return lines


def _short(frame: str) -> str:
    """'func (path/to/module.py:123)' -> 'func (module.py:123)'."""
    name, _, where = frame.partition(" (")
    if not where:
        return frame
    return f"{name} ({where.rstrip(')').rsplit('/', 1)[-1]})"
