"""Data-parallel training: a sharded step equals the single-device step.

A batch that does not split over the devices is refused with a message.

JAX fixes the number of CPU devices when it starts, so the 4-device checks run in
a subprocess with ``--xla_force_host_platform_device_count=4``.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from ofg_jax.training import parallel

REPO = pathlib.Path(__file__).resolve().parents[2]

SHARDED_VS_SINGLE = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from ofg_jax.configs import default
from ofg_jax.settings import config as config_lib
from ofg_jax.training import parallel
from ofg_jax.training import step as train_step
from tests.step_fixtures import TinyNet  # A small network keeps compilation short.


assert jax.device_count() == 4, jax.devices()
mode = sys.argv[1]
config = default.get_config()
config.data.name = "synthetic"
config.train.mode = mode
config.train.epochs = 2
config.train.batch_size = 4
config.train.learning_rate = 1e-2
config.ofg.steps = 3
size = (16, 16, 16)
model = TinyNet(dropout=0.0)
rng = np.random.default_rng(0)
batch = {k: rng.random((4, *size), dtype=np.float32) for k in ("moving", "fixed")}

def one_step(state, batch):
    step = train_step.make_train_step(config_lib.resolve(config), 3, size)
    state, metrics = step(state, batch)
    return jax.device_get((state.params, state.opt_state, metrics))

single = one_step(train_step.create_train_state(config, model, size, 3), batch)
mesh = parallel.data_mesh()
try:
    parallel.check_batch_size(6, mesh)
    raise AssertionError("a batch of 6 over 4 devices was accepted")
except ValueError as e:
    assert "train.batch_size=6 is not divisible by the 4 devices" in str(e), e
state = parallel.replicate(train_step.create_train_state(config, model, size, 3), mesh)
sharded_batch = parallel.shard_batch(batch, mesh)
shards = sharded_batch["moving"].addressable_shards
assert len(shards) == 4 and all(s.data.shape == (1, *size) for s in shards)
sharded = one_step(state, sharded_batch)

diff = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), single, sharded)
scale = jax.tree.map(lambda a: float(np.max(np.abs(a))), single)
print(json.dumps({"diff": jax.tree.leaves(diff), "scale": jax.tree.leaves(scale),
                  "update_norm": float(single[2]["update_norm"])}))
"""


@pytest.mark.parametrize("mode", ["ofg", "unsupervised"])
def test_sharded_step_equals_single_device_step(mode):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, "-c", SHARDED_VS_SINGLE, mode], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["update_norm"] > 1e-3  # the step really moved the parameters
    for diff, scale in zip(result["diff"], result["scale"]):
        assert diff <= 1e-5 * max(scale, 1.0), (diff, scale)


def test_local_slice_covers_the_whole_batch_on_one_process():
    assert parallel.local_slice(8) == slice(0, 8)
