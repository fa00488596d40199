"""Developer sessions: `nox -s tests` is what CI and the README run."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]


def _install(session: nox.Session) -> None:
    session.install("-e", ".[dev]")


@nox.session
def tests(session: nox.Session) -> None:
    """The CPU test suite (tests marked `gpu` are skipped)."""
    _install(session)
    session.run("pytest", "-m", "not gpu", *session.posargs)


@nox.session
def gpu(session: nox.Session) -> None:
    """Tests that need CUDA (run on a GPU machine)."""
    _install(session)
    session.run("pytest", "-m", "gpu", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", "dmstab", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "dmstab", "tests", "benchmarks", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the library."""
    _install(session)
    session.run("mypy", "dmstab")


@nox.session
def bench(session: nox.Session) -> None:
    """Training throughput and memory (meant for a GPU; runs at toy size on CPU)."""
    _install(session)
    session.run("python", "benchmarks/train_throughput.py", *session.posargs)
