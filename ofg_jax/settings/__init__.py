"""The settings of a training run: what the training, the registration of scans
with a trained network and the command lines read from a config.

- :mod:`~ofg_jax.settings.config`: loading a config file, its overrides, the
  checks, the networks' options and what ``config.json`` records;
- :mod:`~ofg_jax.settings.losses`: the model loss (OFG's Eq. 3, the
  unsupervised loss, the intensity ablations);
- :mod:`~ofg_jax.settings.inner_optimizer`: the inner optimiser's settings
  (``RefineSettings``) and the refinement they build.

Importing the package imports none of them (``settings.config`` imports no JAX:
the command lines check their flags with it first).
"""
