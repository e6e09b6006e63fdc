"""Checks that matter (DESIGN.md §6). `.ci/run` runs `nox -s lint sanitize tests parity compat`.

Every session builds lowbit from this checkout into its own virtualenv. torch always comes
from the pinned local CPU wheel: an unpinned torch would pull several GB of CUDA packages.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = False

TORCH = "torch==2.13.0"
BITSANDBYTES = "bitsandbytes==0.50.2"
REQUIRE_NATIVE = {"LOWBIT_REQUIRE_NATIVE": "1"}


def install_lowbit(session: nox.Session, *extra: str) -> None:
    session.install(TORCH)
    session.install(".[test]", *extra)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over every Python file in the checkout."""
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def tests(session: nox.Session) -> None:
    """Unit tests on every backend that loads here (the native CPU build must load)."""
    install_lowbit(session)
    session.run("pytest", "tests", "--ignore=tests/compat", *session.posargs, env=REQUIRE_NATIVE)


@nox.session
def parity(session: nox.Session) -> None:
    """Every available backend against the reference, op by op, bit-exact where DESIGN.md says so."""
    install_lowbit(session)
    session.run(
        "pytest", "tests/test_parity.py", "tests/test_formats.py", "tests/test_op_schemas.py", "-v",
        *session.posargs, env=REQUIRE_NATIVE,
    )  # fmt: skip


@nox.session
def compat(session: nox.Session) -> None:
    """Byte-for-byte agreement with the real bitsandbytes package, and checkpoint interchange."""
    install_lowbit(session, BITSANDBYTES)
    session.run("pytest", "tests/compat", *session.posargs, env=REQUIRE_NATIVE)


@nox.session
def sanitize(session: nox.Session) -> None:
    """The native library and its C++ self-test under AddressSanitizer + UBSan."""
    session.install("cmake", "ninja")
    build = session.create_tmp()
    session.run(
        "cmake", "-S", ".", "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Debug",
        "-DLOWBIT_SANITIZE=ON", "-DLOWBIT_BUILD_TESTS=ON",
    )  # fmt: skip
    session.run("cmake", "--build", build)
    session.run("ctest", "--test-dir", build, "--output-on-failure")
