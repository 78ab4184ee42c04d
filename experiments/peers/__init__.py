"""Adapters of the peer registration tools (``experiments.registration_peers``).

Each adapter runs in its tool's own virtualenv, as ``python -m
experiments.peers.<tool> --fixed F --moving M --out DIR --threads N`` from the
repository root, and imports nothing of ``ofg_jax`` (only the standard library,
:mod:`experiments.peers.protocol`, and its tool). It registers the moving image
to the fixed one with the tool's documented recipe and writes into ``DIR``:

- ``field.nii.gz``: the whole transform (linear and deformable stages composed)
  as an ITK / ANTs displacement field on the fixed image's grid: LPS mm, the
  fixed point ``p`` shows the moving image at ``p + field(p)``;
- ``warped.nii.gz``: the moving image on the fixed grid as the tool itself
  resamples it (the experiment checks that its own resampling through
  ``field.nii.gz`` agrees);
- ``peer.json``: ``registration_seconds`` (the registration calls alone,
  timed in the adapter's process, compilation included where a tool compiles),
  the tool's version, the recipe (every parameter passed), and the thread
  settings seen by the process.
"""
