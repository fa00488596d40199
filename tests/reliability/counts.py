"""Totals of the fault-injection suite: every reliability test adds what it did here."""

from __future__ import annotations

from collections import Counter

TOTALS = {"trials": 0, "faults": 0, "resumes": 0, "losses": 0, "tests": 0}
# seconds each mistake of the bad-input catalogue took to be refused, in this process
ANSWER_SECONDS: dict[str, float] = {}
MOMENTS: Counter[str] = Counter()  # kill -9s by the moment they struck (test_kill9, test_soak)


def record(
    trials: int = 0, faults: int = 0, resumes: int = 0, losses: int = 0, tests: int = 0
) -> None:
    """Add to the suite's totals; `losses` counts lost or duplicated metric steps, unreadable
    checkpoints and weight mismatches found (the tests assert none); `tests` the tests run."""
    for key, value in zip(TOTALS, (trials, faults, resumes, losses, tests), strict=True):
        if value < 0:
            raise ValueError(f"counts.record({key}={value}): counts only grow")
        TOTALS[key] += value


def killed_at(moment: str) -> None:
    """One kill -9 at `moment` (also counted as a trial and a fault)."""
    record(trials=1, faults=1)
    MOMENTS[moment] += 1


def merge(totals: dict[str, int], moments: dict[str, int] | None = None) -> None:
    """Add another process's totals (a pytest-xdist worker's) to these."""
    record(**totals)
    MOMENTS.update(moments or {})


def moments_line() -> str | None:
    """The kills by moment, e.g. `fault-injection kills by moment: checkpoint 3, step 4`."""
    if not MOMENTS:
        return None
    parts = ", ".join(f"{moment} {count}" for moment, count in sorted(MOMENTS.items()))
    return f"fault-injection kills by moment: {parts}"


def summary() -> str:
    """One line, e.g. `fault-injection: 42 trials, 42 faults injected, 37 resumes, 0 losses`."""
    t = TOTALS
    return (
        f"fault-injection: {t['trials']} trials, {t['faults']} faults injected, "
        f"{t['resumes']} resumes, {t['losses']} losses"
    )


def slowest_answer() -> str | None:
    """One line on the bad-input catalogue's refusals timed here, or None if none were."""
    if not ANSWER_SECONDS:
        return None
    what, seconds = max(ANSWER_SECONDS.items(), key=lambda item: item[1])
    return (
        f"bad-input catalogue: {len(ANSWER_SECONDS)} mistakes answered, "
        f"slowest in {seconds:.2f} s ({what})"
    )
