"""Training a registration network with OFG: the train step and the loop.

- the train step: :mod:`~ofg_jax.training.step` (``TrainState``, a pure
  ``train_step(state, batch)``), :mod:`~ofg_jax.training.parallel` (the batch
  over devices);
- the loop: :mod:`~ofg_jax.training.loop` (``train_and_evaluate``) and what it
  runs on: :mod:`~ofg_jax.training.input_pipeline`,
  :mod:`~ofg_jax.training.scoring` (Dice and folding of a network on a split),
  :mod:`~ofg_jax.training.checkpoints`, :mod:`~ofg_jax.training.workdir`,
  :mod:`~ofg_jax.training.log`, :mod:`~ofg_jax.training.distributed`,
  :mod:`~ofg_jax.training.interrupt`, :mod:`~ofg_jax.training.host_memory`.

Its settings are :mod:`ofg_jax.settings`. Importing the package imports none of
its modules.
"""
