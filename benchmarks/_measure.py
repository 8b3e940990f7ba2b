"""Measuring helpers shared by the benchmarks: an RSS sampler, machine info, tables.

:class:`RssSampler` reads ``/proc/self/status`` from a background thread every ~2 ms
while a block runs and keeps the maxima of ``VmRSS``, ``RssAnon`` (heap: tensors, the
model) and ``RssFile`` (file pages mapped into the process: mmap'd checkpoints). Before
the block it resets the kernel's peak counter (``/proc/self/clear_refs``, value 5) so
``VmHWM`` afterwards is the true peak of the block even between two samples.

>>> with RssSampler() as rss:                      # doctest: +SKIP
...     load()
>>> rss.peak_above_base()["rss"]                   # bytes above the RSS before the block
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")


def read_status() -> dict[str, int]:
    """The memory fields of ``/proc/self/status``, in bytes."""
    out: dict[str, int] = {}
    with open("/proc/self/status", "rb") as f:
        for line in f:
            name, _, rest = line.partition(b":")
            text = name.decode()
            if text in FIELDS:
                out[text] = int(rest.split()[0]) * 1024
    return out


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Samples this process's memory every ``interval`` seconds while the block runs."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.base: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.samples = 0
        self.hwm_reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        now = read_status()
        for k, v in now.items():
            if v > self.peak.get(k, 0):
                self.peak[k] = v
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.hwm_reset = reset_peak()
        self.base = read_status()
        self.peak = dict(self.base)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def peak_above_base(self) -> dict[str, int]:
        """Peak minus base, in bytes: ``rss`` (the larger of sampled VmRSS and VmHWM when
        the reset worked), ``anon`` and ``file`` (each its own maximum)."""
        rss = self.peak["VmRSS"]
        if self.hwm_reset:
            rss = max(rss, self.peak.get("VmHWM", 0))
        return {
            "rss": rss - self.base["VmRSS"],
            "anon": self.peak["RssAnon"] - self.base["RssAnon"],
            "file": self.peak["RssFile"] - self.base["RssFile"],
        }


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``."""

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0


def warm_file(path: str | os.PathLike[str], chunk: int = 64 << 20) -> float:
    """Read a file once (into a reused buffer, so RSS does not grow) to put it in the page
    cache; returns the seconds it took."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
    return time.perf_counter() - t0


class ForeignCpu:
    """CPU time used by processes other than this one and its children, while the block
    runs: a benchmark sharing its cores with other work reads slower than it is.

    >>> with ForeignCpu() as other:                 # doctest: +SKIP
    ...     run()
    >>> other.cores                                 # average number of cores others kept busy
    """

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self) -> ForeignCpu:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.seconds = max(0.0, (self._busy() - self.busy0) - (self._own() - self.own0))
        self.cores = self.seconds / self.wall if self.wall else 0.0


def machine_info() -> dict[str, Any]:
    """Cores, RAM, CPU model, OS, Python and library versions, and the repo's commit."""
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        meminfo = Path("/proc/meminfo").read_text()
        info["ram_bytes"] = int(meminfo.split("MemTotal:")[1].split()[0]) * 1024
        cpu = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        info["cpu"] = cpu[0].split(":", 1)[1].strip() if cpu else platform.processor()
    except (OSError, IndexError):
        pass
    for name in ("torch", "safetensors", "numpy", "regex", "remap"):
        try:
            info[name] = __import__(name).__version__
        except Exception:
            info[name] = None
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    info["remap_commit"] = remap_commit()
    return info


def remap_commit() -> str | None:
    """The repository's HEAD, with ``+dirty`` when ``src/`` has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "src"], capture_output=True, text=True)
    except OSError:
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def table(title: str, columns: list[str], rows: list[list[str]], notes: list[str] = ()) -> None:  # type: ignore[assignment]
    """Print a table: rich when it is installed, aligned plain text otherwise."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None  # noqa: N806
    if Console is not None:
        t = Table(title=title, title_justify="left", caption="\n".join(notes) or None, caption_justify="left")
        for i, c in enumerate(columns):
            t.add_column(c, justify="left" if i < 2 else "right", no_wrap=True)
        for r in rows:
            t.add_row(*r)
        width = sum(max([len(c), *(len(r[i]) for r in rows)]) + 3 for i, c in enumerate(columns)) + 1
        Console(width=max(100, min(250, width)), soft_wrap=False).print(t)
        return
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    print(title)
    print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths))))
    for r in rows:
        print("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    for n in notes:
        print(n)
    sys.stdout.flush()


def run_status(r: dict[str, Any]) -> str:
    """A child run's verdict: ``n/a: …`` (it died), ``WRONG: …`` (its own check failed) or ``ok``.

    >>> run_status({"problems": ["w differs"]}), run_status({})
    ('WRONG: w differs', 'ok')
    """
    if "error" in r:
        return "n/a: " + r["error"]
    if r.get("problems"):
        return "WRONG: " + "; ".join(r["problems"])
    if r.get("remap_ok") is False:
        return "WRONG: remap report not ok"
    return "ok"


def finish(result: dict[str, Any], show: Any, failures: Any, *, started: float, out: Path | None = None) -> int:
    """The end of a harness's ``main``: the table, the JSON (when ``out``), the time taken, and
    exit 1 when any case failed its own check (``failures(result)`` lists them)."""
    import json

    show(result)
    if out:
        out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{time.perf_counter() - started:.0f} s")
    bad = failures(result)
    for b in bad:
        print(f"FAILED: {b}")
    return 1 if bad else 0
