"""Fixtures shared by the test modules."""

import pytest

from tests import registration_fixtures


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory) -> str:
    """A workdir of the tiny registration config, trained once per session."""
    from ofg_jax import train
    workdir = str(tmp_path_factory.mktemp("trained"))
    train.train_and_evaluate(registration_fixtures.tiny_config(), workdir)
    return workdir
