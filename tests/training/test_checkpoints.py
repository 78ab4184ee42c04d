"""Checkpoint retention: the latest and the best by Dice, across restarts."""

import numpy as np

from ofg_jax.training import checkpoints


def _state(value):
    return {"w": np.full((3,), value, np.float32)}


def test_best_checkpoints_survive_a_restart(tmp_path):
    directory = str(tmp_path / "checkpoints")
    first = checkpoints.Checkpoints(directory, keep_best=2)
    for step, dice in [(1, 0.50), (2, 0.70), (3, 0.60), (4, 0.55)]:
        first.save(step, _state(step), {"step": step}, dice=dice)
    assert first.all_steps() == [2, 3, 4]  # best two (2, 3) and the latest (4)
    first.close()

    # A resumed run reopens the directory: the Dice of the old checkpoints was
    # written to disk, so they are still ranked, not dropped as metric-less.
    second = checkpoints.Checkpoints(directory, keep_best=2)
    assert second.best_step() == 2
    second.save(5, _state(5), {"step": 5})  # a mid-epoch save without Dice
    second.save(6, _state(6), {"step": 6}, dice=0.65)
    assert second.all_steps() == [2, 6]
    assert second.latest_step() == 6 and second.best_step() == 2
    state, meta = second.restore(2, _state(0))
    np.testing.assert_array_equal(state["w"], _state(2)["w"])
    assert meta == {"step": 2}
    second.close()
