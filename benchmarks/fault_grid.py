"""Break `stagewise train` as a cluster would, and tabulate how each run ends.

Each case starts the real CLI in a subprocess (its own TMPDIR, so a leaked temporary folder is
seen), waits until the run prints step ``moment``, injects the fault, and classifies the end:

- clean: a non-zero exit with a one-line ``stagewise:`` message, within --timeout + 15 s (for
  checkpoint faults: refused with a message, or a resume that repeats the uninterrupted losses);
- slow: the same, later; hang: still running at --timeout + 90 s (then killed);
- orphan: a rank still alive 5 s after the launcher ended, or a temporary folder left;
- wrong: exit 0 although a fault was injected, or a resume with other losses;
- traceback: a Python traceback on stderr.

Faults: ``kill`` / ``stop`` one rank (SIGKILL / SIGSTOP), ``launcher-kill`` / ``launcher-term``,
checkpoint damage before a resume (``flip``: 16 bytes of a shard, ``truncate``, ``empty``,
``marker``: COMPLETE deleted), ``shared``: a second run on the same --checkpoint-dir, ``disk``:
the disk fills at the first save.

    .venv/bin/python benchmarks/fault_grid.py            # the full grid (about 15 minutes)
    .venv/bin/python benchmarks/fault_grid.py --quick    # the slice the tests run
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

STAGEWISE = str(Path(sys.executable).with_name("stagewise"))
PROCESS_FAULTS = ("kill", "stop", "launcher-kill", "launcher-term")
CHECKPOINT_FAULTS = ("flip", "truncate", "empty", "marker", "shared", "disk")


@dataclass(frozen=True)
class Case:
    """One run and the fault injected into it."""

    fault: str
    schedule: str = "1f1b"
    mesh: str = "pp=2"
    rank: int = 1
    moment: int = 2  # the step after which the fault comes
    steps: int = 8
    timeout: float = 10.0
    chunks: int = 1  # -v, for interleaved schedules

    def argv(self, extra: tuple[str, ...] = ()) -> list[str]:
        """The train command of this case."""
        return [STAGEWISE, "train", "-s", self.schedule, "--mesh", self.mesh, "-m", "4",
                "--global-batch", "8", "--seq-len", "16", "--dim", "32", "--layers", "4",
                "--steps", str(self.steps), "--timeout", f"{self.timeout:g}", "--no-plots",
                *(("-v", str(self.chunks)) if self.chunks > 1 else ()), *extra]


@dataclass
class Result:
    """How a case ended."""

    case: Case
    outcome: str
    seconds: float  # from the fault to the launcher's exit (or the refusal)
    message: str = ""
    notes: list[str] = field(default_factory=list)


class _Run:
    """A train subprocess, its output read by threads, its ranks found by pid."""

    def __init__(self, argv: list[str], folder: Path) -> None:
        self.tmp = folder / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, TMPDIR=str(self.tmp), PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=env, cwd=folder, start_new_session=True)
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.process.stdout, self.out), (self.process.stderr, self.err)):
            threading.Thread(target=_drain, args=(stream, sink), daemon=True).start()

    def wait_for_step(self, step: int, limit: float) -> bool:
        """Wait until the run printed step ``step`` (False: it ended or ``limit`` passed)."""
        end = time.monotonic() + limit
        while time.monotonic() < end and self.process.poll() is None:
            if any(line.split()[:2] == ["step", str(step)] for line in list(self.out)):
                return True
            time.sleep(0.05)
        return False

    def ranks(self) -> list[psutil.Process]:
        """The rank processes, in rank order (their start order)."""
        try:
            children = psutil.Process(self.process.pid).children()
        except psutil.Error:
            return []
        found = [c for c in children if "spawn_main" in " ".join(_cmdline(c))]
        return sorted(found, key=lambda c: c.create_time())

    def finish(self, limit: float) -> tuple[int | None, float]:
        """Wait for the launcher's exit (None: still running at ``limit``, then killed)."""
        start = time.monotonic()
        try:
            code: int | None = self.process.wait(limit)
        except subprocess.TimeoutExpired:
            code = None
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        time.sleep(0.3)
        return code, time.monotonic() - start


def _drain(stream: object, sink: list[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        sink.append(line)


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return [str(part) for part in process.cmdline()]
    except psutil.Error:
        return []


def _leftovers(ranks: list[psutil.Process]) -> list[psutil.Process]:
    """Ranks still alive 5 s after the launcher ended (then killed)."""
    time.sleep(0.2)
    end = time.monotonic() + 5
    alive = [r for r in ranks if r.is_running() and r.status() != psutil.STATUS_ZOMBIE]
    while alive and time.monotonic() < end:
        time.sleep(0.1)
        alive = [r for r in alive if r.is_running() and r.status() != psutil.STATUS_ZOMBIE]
    for rank in alive:
        rank.kill()
    return alive


def _classify(case: Case, code: int | None, seconds: float, err: str, orphans: int,
              leaked: list[str], expect_signal: bool = False) -> tuple[str, str]:
    lines = [line for line in err.splitlines() if line.startswith("stagewise:")]
    tail = err.strip().splitlines()
    message = lines[-1] if lines else (tail[-1] if tail else "")
    if code is None:
        return "hang", message
    if orphans or leaked:
        return "orphan", f"{orphans} rank(s) left, temp {leaked}"
    if "Traceback (most recent call last)" in err:
        return "traceback", message
    if code == 0:
        return "wrong", "exit 0 after a fault"
    if not expect_signal and not lines:
        return "traceback", message
    return ("clean" if seconds <= case.timeout + 15 else "slow"), message


def run_process_case(case: Case, folder: Path) -> Result:
    """A rank killed or stopped, or the launcher killed or terminated, after step ``moment``."""
    run = _Run(case.argv(), folder)
    if not run.wait_for_step(case.moment, 300):
        run.finish(1)
        return Result(case, "traceback", 0.0, "the run never reached the moment: "
                      + "".join(run.err)[-300:])
    ranks = run.ranks()
    start = time.monotonic()
    if case.fault in ("kill", "stop"):
        ranks[case.rank].send_signal(signal.SIGKILL if case.fault == "kill" else signal.SIGSTOP)
    else:
        sig = signal.SIGKILL if case.fault == "launcher-kill" else signal.SIGTERM
        os.kill(run.process.pid, sig)
    code, _ = run.finish(case.timeout + 90)
    seconds = time.monotonic() - start
    orphans = _leftovers(ranks)
    leaked = sorted(p.name for p in run.tmp.glob("stagewise-*"))
    outcome, message = _classify(case, code, seconds, "".join(run.err), len(orphans), leaked,
                                 expect_signal=case.fault == "launcher-kill")
    return Result(case, outcome, seconds, message)


def run_checkpoint_case(case: Case, folder: Path) -> Result:
    """Train with checkpoints, damage the newest (or start a second run on the folder), then
    resume; compare with the uninterrupted losses."""
    ckpt = folder / "ckpt"
    save = ("--checkpoint-dir", str(ckpt), "--save-every", "2", "--json")
    if case.fault == "shared":
        first = _Run(Case(case.fault, steps=60).argv(save[:4]), folder / "a")  # prints steps
        time.sleep(0.5)  # two runs started within a second of each other
        start = time.monotonic()
        second = _Run(case.argv(save), folder / "b")
        code, _ = second.finish(case.timeout + 90)
        seconds = time.monotonic() - start
        os.killpg(first.process.pid, signal.SIGTERM)
        first.finish(60)
        outcome, message = _classify(case, code, seconds, "".join(second.err), 0, [])
        return Result(case, outcome, seconds, message)
    if case.fault == "disk":
        return _full_disk(case, folder, ckpt, save)
    whole = subprocess.run(case.argv(save), capture_output=True, text=True, cwd=folder,
                           check=False)
    if whole.returncode != 0:
        return Result(case, "traceback", 0.0, whole.stderr[-300:])
    shutil.rmtree(ckpt / f"step-{case.steps:08d}", ignore_errors=True)  # resume before it
    _damage(sorted(ckpt.glob("step-*"))[-1], case.fault)
    start = time.monotonic()
    resumed = subprocess.run(case.argv(("--checkpoint-dir", str(ckpt), "--resume", "--json")),
                             capture_output=True, text=True, cwd=folder, check=False)
    seconds = time.monotonic() - start
    outcome, message = _classify(case, resumed.returncode, seconds, resumed.stderr, 0, [])
    if resumed.returncode == 0:
        import json

        same = json.loads(resumed.stdout)["losses"] == json.loads(whole.stdout)["losses"]
        outcome, message = ("clean", "resumed, same losses") if same else (
            "wrong", "resumed with other losses")
    return Result(case, outcome, seconds, message)


def _full_disk(case: Case, folder: Path, ckpt: Path, save: tuple[str, ...]) -> Result:
    """A disk that fills at the first save: files may grow to 200 kB (RLIMIT_FSIZE), less
    than one shard, so the write fails as on a full disk (EFBIG instead of ENOSPC)."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    start = time.monotonic()
    run = subprocess.run(case.argv(save), capture_output=True, text=True, cwd=folder,
                         check=False, preexec_fn=limit)
    seconds = time.monotonic() - start
    outcome, message = _classify(case, run.returncode, seconds, run.stderr, 0, [])
    left = sorted(p.name for p in ckpt.glob("*.partial"))
    if left and outcome == "clean":
        outcome, message = "wrong", f"partial folder left: {left}"
    return Result(case, outcome, seconds, message)


def _damage(folder: Path, fault: str) -> None:
    shards = sorted(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard = shards[-1]
    if fault == "flip":
        data = bytearray(shard.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 16] = bytes(255 - b for b in data[middle:middle + 16])
        shard.write_bytes(bytes(data))
    elif fault == "truncate":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif fault == "empty":
        shard.write_bytes(b"")
    elif fault == "marker":
        (folder / "COMPLETE").unlink()


def run_case(case: Case) -> Result:
    """Run one case in a fresh folder."""
    with tempfile.TemporaryDirectory(prefix="fault-grid-") as folder:
        if case.fault in CHECKPOINT_FAULTS:
            return run_checkpoint_case(case, Path(folder))
        return run_process_case(case, Path(folder))


def grid(quick: bool) -> list[Case]:
    """The cases: schedule x mesh x rank x moment x fault (a slice with ``quick``)."""
    if quick:
        return [Case("stop"), Case("launcher-kill"), Case("flip", steps=6), Case("disk", steps=6)]
    cases = [Case(fault, schedule, mesh, rank, moment, chunks=chunks)
             for fault in PROCESS_FAULTS
             for schedule, mesh, chunks in (("1f1b", "pp=2", 1), ("interleaved-1f1b", "pp=2", 2),
                                            ("zb-h1", "pp=2,dp=2", 1))
             for rank in (0, 1) for moment in (1, 4)
             if fault.startswith("launcher") is False or rank == 0]
    cases += [Case(fault) for fault in CHECKPOINT_FAULTS]
    return cases


def main() -> None:
    """Run the grid and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small slice the tests run")
    args = parser.parse_args()
    results = []
    print(f"{'fault':<14} {'schedule':<12} {'mesh':<10} {'rank':>4} {'after':>5} "
          f"{'outcome':<9} {'stop s':>7}  message")
    for case in grid(args.quick):
        result = run_case(case)
        results.append(result)
        print(f"{case.fault:<14} {case.schedule:<12} {case.mesh:<10} {case.rank:>4} "
              f"{case.moment:>5} {result.outcome:<9} {result.seconds:7.1f}  "
              f"{result.message[:110]}", flush=True)
    counts: dict[str, int] = {}
    for result in results:
        counts[result.outcome] = counts.get(result.outcome, 0) + 1
    worst = max(r.seconds for r in results)
    print(f"{len(results)} cases: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
          + f"; slowest stop {worst:.1f} s")


if __name__ == "__main__":
    main()
