"""Developer tasks. ``nox -s quickstart`` and ``nox -s tests`` are the README's two commands.

Every session installs the package with ``constraints.txt`` (torch==2.13.0), which pins torch for
CPU and GPU users alike without making the package itself depend on one exact build.
"""

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]

INSTALL = ("-c", "constraints.txt", "-e", ".[dev]")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (CPU; GPU-only tests skip)."""
    session.install(*INSTALL)
    # pytest exits 5 when it collects nothing (e.g. `-k` matching no test): not a failure here.
    session.run("pytest", *(session.posargs or ["-q"]), success_codes=[0, 5])


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and format check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "src", "tests", "benchmarks", "examples", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "examples", "noxfile.py")


@nox.session
def quickstart(session: nox.Session) -> None:
    """Train the quickstart recipe (a few minutes on 2 CPU cores)."""
    session.install(*INSTALL)
    session.run("covr-lightning", "fit", "--recipe", "quickstart", *session.posargs)


@nox.session
def benchmark(session: nox.Session) -> None:
    """Print throughput figures (render, updates, training) for a recipe."""
    session.install(*INSTALL)
    session.run("python", "benchmarks/throughput.py", *session.posargs)
