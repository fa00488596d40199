"""Developer sessions: `nox -s tests` is what CI and the README run."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]


# pytest-xdist: one worker per core of a 2-core machine, idle workers steal tests.
PARALLEL = ("-n", "2", "--dist", "worksteal")
INSTALLED_STAMP = ".dmstab-installed"  # in the session's virtualenv: pyproject.toml's hash


def _install(session: nox.Session, extra: str = "dev") -> None:
    """`pip install -e .[EXTRA]`, skipped when the reused virtualenv was installed from this very
    pyproject.toml: the editable install already sees every source change, and pip alone
    takes about 20 s on a 2-core machine."""
    stamp = Path(session.virtualenv.location) / INSTALLED_STAMP
    wanted = hashlib.sha256(Path("pyproject.toml").read_bytes()).hexdigest()
    if stamp.is_file() and stamp.read_text() == wanted:
        session.log("pyproject.toml unchanged since this virtualenv's install: pip skipped")
        return
    session.install("-e", f".[{extra}]")
    stamp.write_text(wanted)


@nox.session
def tests(session: nox.Session) -> None:
    """The CPU test suite, on two pytest-xdist workers (tests marked `gpu`, `soak` or `browser`
    skipped)."""
    _install(session)
    session.run("pytest", "-m", "not gpu and not soak and not browser", *PARALLEL, *session.posargs)


@nox.session
def quick(session: nox.Session) -> None:
    """The CPU suite without the tests marked `slow`, stopping at the first failure."""
    _install(session)
    session.run(
        "pytest",
        "-m",
        "not gpu and not slow and not soak and not browser",
        "-x",
        *PARALLEL,
        *session.posargs,
    )


@nox.session
def soak(session: nox.Session) -> None:
    """The kill -9 soak (tests marked `soak`), outside the suite: about 20 minutes on 2 cores.

    $DMSTAB_SOAK_TRIALS kills (100 unless set) of training runs, sweeps and spooled runs at
    random moments, each resumed; $DMSTAB_SOAK_SEED replays a printed seed (docs/tracking.md).
    Then test_kill9.py's 12 kills of one EDM run at each kind of write.
    """
    _install(session)
    env = {
        "DMSTAB_SOAK_TRIALS": os.environ.get("DMSTAB_SOAK_TRIALS", "100"),
        "OMP_NUM_THREADS": "1",
    }
    session.run("pytest", "-m", "soak", "tests/reliability", *session.posargs, env=env)


@nox.session
def gpu(session: nox.Session) -> None:
    """Tests that need CUDA (run on a GPU machine)."""
    _install(session)
    session.run("pytest", "-m", "gpu", *session.posargs)


@nox.session
def browser(session: nox.Session) -> None:
    """The MLflow UI in headless Chromium (tests marked `browser`): a tiny quickstart run served
    by a real `mlflow server`, its pages checked and screenshotted. Needs Debian's browser and
    driver (`apt-get install -y chromium chromium-driver`); skipped without them.
    DMSTAB_SCREENSHOTS=docs/img copies the screenshots into the documentation."""
    _install(session, "dev,browser")
    session.run("pytest", "-m", "browser", *session.posargs, env={"OMP_NUM_THREADS": "1"})


DOCS_CODE = ("docs/hooks.py", "docs/gen_reference.py", "docs/gen_published.py")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff, and the layer contracts of pyproject.toml (import-linter)."""
    session.install("ruff>=0.6", "import-linter>=2.1")
    session.install("--no-deps", "-e", ".")  # import-linter reads the installed package's source
    code = ("dmstab", "tests", "benchmarks", "noxfile.py", *DOCS_CODE)
    session.run("ruff", "check", *code)
    session.run("ruff", "format", "--check", *code)
    session.run("lint-imports")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the library."""
    _install(session)
    session.run("mypy", "dmstab")


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site (mkdocs, Material theme) into site/, in strict mode: any warning
    fails the build. The recipe reference and every command's --help are generated from the
    code as it builds (docs/hooks.py, docs/gen_reference.py). Arguments after `--` replace
    `build --strict`: `nox -s docs -- serve` previews the site."""
    _install(session, "docs")
    arguments = session.posargs or ["build", "--strict"]
    session.run("mkdocs", *arguments, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session(name="tracking-server")
def tracking_server(session: nox.Session) -> None:
    """A shared MLflow server: `nox -s tracking-server -- [HOST [PORT [BACKEND_URI [ARTIFACTS]]]]`.

    Defaults (or DMSTAB_SERVER_HOST/_PORT/_BACKEND/_ARTIFACTS): 127.0.0.1, 5000, sqlite:///
    mlflow-server.db and ./mlflow-artifacts, uploaded through the server (docs/tracking.md).
    """
    defaults = [
        os.environ.get("DMSTAB_SERVER_HOST", "127.0.0.1"),
        os.environ.get("DMSTAB_SERVER_PORT", "5000"),
        os.environ.get("DMSTAB_SERVER_BACKEND", "sqlite:///mlflow-server.db"),
        os.environ.get("DMSTAB_SERVER_ARTIFACTS", "mlflow-artifacts"),
    ]
    host, port, backend, artifacts = [*session.posargs, *defaults[len(session.posargs) :]][:4]
    session.install("mlflow>=3")
    session.log(f"export MLFLOW_TRACKING_URI=http://{host}:{port}")
    session.run(
        *("mlflow", "server", "--backend-store-uri", backend),
        *("--artifacts-destination", artifacts, "--serve-artifacts"),
        *("--host", host, "--port", port),
    )


@nox.session
def bench(session: nox.Session) -> None:
    """dmstab against the reference approaches, side by side (benchmarks/run.py): CPU sizes by
    default, about 5 minutes on 2 cores; `nox -s bench -- --full` for the papers' sizes on a GPU,
    `-- --only NAME` for one. JSON per benchmark in bench-results/."""
    _install(session)
    session.run("python", "-m", "benchmarks.run", *session.posargs)
