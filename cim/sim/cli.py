"""
The simulator's command line (C{make sim}): run one seed and print its
trace when it fails (C{--seed}), or many (C{--seeds}, from C{--first}),
over several processes (C{--jobs}); the exit status is 1 when a seed fails.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence

from cim.sim.run import Result, run

_QUIET: list[bool] = []


def _quiet() -> None:
    """
    Production logs go nowhere (the simulator's observer still sees them).
    """
    from twisted.logger import globalLogBeginner

    if not _QUIET:
        _QUIET.append(True)
        globalLogBeginner.beginLoggingTo([], redirectStandardIO=False)


def _run_range(args: tuple[int, int, str | None, bool]) -> list[Result]:
    first, count, broken, stop = args
    _quiet()
    results = []
    for seed in range(first, first + count):
        result = run_seed(seed, broken)
        results.append(result)
        if stop and not result.ok:
            break
    return results


def run_seed(seed: int, broken: str | None = None, verbose: bool = False) -> Result:
    """
    Run C{seed}, with the broken variant C{broken} of the system if given
    (L{cim.sim.breaks}).
    """
    if broken is None:
        return run(seed, verbose=verbose)
    from cim.sim.breaks import broken_system

    with broken_system(broken):
        result = run(seed, verbose=verbose)
    result.broken = broken
    return result


def run_seeds(
    first: int,
    count: int,
    jobs: int,
    broken: str | None = None,
    stop: bool = False,
) -> list[Result]:
    """
    Run C{count} seeds from C{first} over C{jobs} processes; the results
    in seed order.  With C{stop}, each process stops at its first failing
    seed (its seeds are interleaved with the others': the first ones of
    the range run first).
    """
    if jobs <= 1 or count < 2 * jobs:
        return _run_range((first, count, broken, stop))
    if stop:
        chunks = [(first + j, 1, broken, True) for j in range(count)]
        context = multiprocessing.get_context("fork")
        with context.Pool(jobs) as pool:
            results = []
            for part in pool.imap(_run_range, chunks):
                results += part
                if not part[-1].ok:
                    pool.terminate()
                    break
        return results
    step = -(-count // (jobs * 4))
    chunks = [
        (start, min(step, first + count - start), broken, False)
        for start in range(first, first + count, step)
    ]
    context = multiprocessing.get_context("fork")
    with context.Pool(jobs) as pool:
        parts = pool.map(_run_range, chunks)
    return [r for part in parts for r in part]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cim.sim", description="The deterministic cluster simulator."
    )
    parser.add_argument(
        "--seed",
        type=int,
        action="append",
        help="run this seed and print its trace if it fails (may be repeated)",
    )
    parser.add_argument("--seeds", type=int, default=200, help="how many seeds")
    parser.add_argument("--first", type=int, default=1, help="the first seed")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="processes"
    )
    parser.add_argument(
        "--broken", help="run a deliberately broken variant (cim.sim.breaks)"
    )
    parser.add_argument(
        "--stop-at-first",
        action="store_true",
        help="stop at the first failing seed (each process at its first)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="trace every message shown"
    )
    options = parser.parse_args(argv)
    if options.seed:
        _quiet()
        failures = 0
        for seed in options.seed:
            result = run_seed(seed, options.broken, options.verbose)
            print(result.report())
            if result.ok:
                print(
                    f"  {result.sends} sends ({result.acked} acknowledged), "
                    f"{result.shown} messages shown, {result.faults} faults"
                )
            failures += not result.ok
        return 1 if failures else 0
    started = time.monotonic()
    results = run_seeds(
        options.first,
        options.seeds,
        options.jobs,
        options.broken,
        options.stop_at_first,
    )
    elapsed = time.monotonic() - started
    failed = [r for r in results if not r.ok]
    for result in failed[:3]:
        print(result.report())
        print()
    sends = sum(r.sends for r in results)
    print(
        f"{len(results)} seeds in {elapsed:.1f}s ({len(results) / elapsed:.1f}/s), "
        f"{sends} sends; {len(failed)} failed"
        + (f": {[r.seed for r in failed][:50]}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
