"""Fixtures shared by the test modules, and how XLA compiles for the tests."""

import os

# Set before anything imports jax, so that the pytest-xdist workers and every
# process the tests start inherit it. The tests check what programs compute,
# at small sizes where compiling them takes longer than running them; XLA
# without its LLVM optimisation passes compiles several times faster, and an
# optimisation level changes the machine code, not what it computes.
_FLAG = "--xla_backend_optimization_level=0"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

import pytest  # noqa: E402

from tests import registration_fixtures  # noqa: E402


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory) -> str:
    """A workdir of the tiny registration config, trained once per session."""
    from ofg_jax.training import loop
    workdir = str(tmp_path_factory.mktemp("trained"))
    loop.train_and_evaluate(registration_fixtures.tiny_config(), workdir)
    return workdir
