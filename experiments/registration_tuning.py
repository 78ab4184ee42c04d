"""The sweep behind the defaults of registration with no network.

    python -m experiments.registration_tuning --pairs-dir /tmp/brain_pairs \\
        --data ../shared/data/oasis_subject_160x192x224.npz --out tuning.json

Each setting of :data:`SETTINGS` registers the tuning pairs of
``experiments/brain_pairs.py`` (``--pairs``, default ``mni_to_subject_2mm``,
``known_200``, ``known_201``; never the reported ``subject_to_mni`` pairs)
after the same affine pre-alignment (``ofg_jax.register_affine``, as
``ofg-register --affine`` runs it, once per pair), on the fixed grid, and is
scored by ``brain_pairs.score``. The settings are the library's options
(``ofg_jax.optimize_displacement``) and three other ways to keep a
displacement from folding, written here as prototypes: its Adam updates
smoothed by a Gaussian, its gradient smoothed, and FireANTs' greedy
compositive updates. ``--timing`` also times each setting's compiled
optimisation (median of 3 calls); ``--steps`` replaces the steps of every
setting, e.g. ``0,0,20`` to time the last level alone.
"""

import argparse
import json
import os
import time
from typing import Any, Callable

import numpy as np


def _velocity(**options) -> dict:
    """Options of the velocity mode with its exponential taken at every step (as
    the first sweep ran them, before ``integrate_every``)."""
    return dict(diffeomorphic=True, integrate_every=1, **options)


# name -> options of optimize_displacement, or ("prototype", name, options).
SETTINGS = {
    "former default (displacement, Grad 2)":
        dict(diffeomorphic=False, steps=(100, 50, 20), learning_rate=0.2, reg_weight=2.0),
    "displacement, Grad 4": dict(diffeomorphic=False, steps=(100, 50, 20),
                                 learning_rate=0.2, reg_weight=4.0),
    "displacement, Grad 8": dict(diffeomorphic=False, steps=(100, 50, 20),
                                 learning_rate=0.2, reg_weight=8.0),
    "displacement, Grad 16": dict(diffeomorphic=False, steps=(100, 50, 20),
                                  learning_rate=0.2, reg_weight=16.0),
    "displacement, updates smoothed (sigma 1)": ("prototype", "smoothed", dict(sigma=1.0)),
    "displacement, gradient smoothed (sigma 1)":
        ("prototype", "smoothed", dict(grad_sigma=1.0)),
    "compositive updates (FireANTs' greedy, sigma 1 and 1, no Grad)":
        ("prototype", "compositive", dict(sigma=1.0, grad_sigma=1.0)),
    "former --diffeomorphic (velocity at full resolution, Grad 2)":
        _velocity(velocity_factor=1, steps=(100, 50, 20), learning_rate=0.2, reg_weight=2.0),
    "velocity twice coarser, Grad 2":
        _velocity(velocity_factor=2, steps=(100, 50, 20), learning_rate=0.2, reg_weight=2.0),
    "velocity twice coarser, Grad 1.5":
        _velocity(velocity_factor=2, steps=(100, 50, 20), learning_rate=0.2, reg_weight=1.5),
    "velocity twice coarser, 200,100,20, Adam 0.1, Grad 1":
        _velocity(velocity_factor=2, steps=(200, 100, 20), learning_rate=0.1, reg_weight=1.0),
    "velocity twice coarser, 200,100,40, Adam 0.1, Grad 1":
        _velocity(velocity_factor=2, steps=(200, 100, 40), learning_rate=0.1, reg_weight=1.0),
    "velocity at full resolution, 200,100,20, Adam 0.1, Grad 1":
        _velocity(velocity_factor=1, steps=(200, 100, 20), learning_rate=0.1, reg_weight=1.0),
    "velocity at full resolution, 200,100,20, Adam 0.1, Grad 1.5":
        _velocity(velocity_factor=1, steps=(200, 100, 20), learning_rate=0.1, reg_weight=1.5),
    "velocity 2,2,1, 200,100,20, Adam 0.1, Grad 1.5":
        _velocity(velocity_factor=(2, 2, 1), steps=(200, 100, 20), learning_rate=0.1,
                  reg_weight=1.5),
    "velocity 2,2,1, 200,100,20, Adam 0.1, Grad 1, exponential every step":
        dict(integrate_every=1),
    "the same, exponential every 2 steps": dict(integrate_every=2),
    "the same, exponential every 4 steps": dict(integrate_every=4),
    "the same, exponential every 5 steps (default)": {},
    "the same, exponential every 10 steps": dict(integrate_every=10),
    "the same, exponential every 20 steps": dict(integrate_every=20),
    "the same, every 5 steps, 5 squarings": dict(int_steps=5),
    "displacement, 200,100,20, Adam 0.1, Grad 1 (--nodiffeomorphic)":
        dict(diffeomorphic=False),
}
TUNING_PAIRS = ("mni_to_subject_2mm", "known_200", "known_201")


def _blur(field, sigma: float):
    """``(*S, C)`` Gaussian blur (truncated at 2.5 sigma) along each spatial axis,
    edges repeated."""
    import jax
    import jax.numpy as jnp
    radius = max(1, int(np.ceil(2.5 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = taps / taps.sum()
    for axis in range(field.ndim - 1):
        pad = [(0, 0)] * field.ndim
        pad[axis] = (radius, radius)
        padded = jnp.pad(field, pad, mode="edge")
        n = field.shape[axis]
        field = sum(float(w) * jax.lax.slice_in_dim(padded, i, i + n, axis=axis)
                    for i, w in enumerate(taps))
    return field


def _prototype(kind: str, sigma: float = 0.0, grad_sigma: float = 0.0
               ) -> Callable[[Any, Any], Any]:
    """``(moving, fixed) -> disp``: the displacement by Adam (0.2) on -NCC (window
    5) over levels 4,2,1 x 100,50,20 (+ Grad 2 for ``smoothed``), its gradient
    and / or update smoothed; ``compositive``: each update composed with the
    field (``u <- d + u(x + d)``) instead of added."""
    import jax
    import jax.numpy as jnp
    from ofg_jax.ncc import ncc_gradient_to
    from ofg_jax.adam import torch_adam
    from ofg_jax.optimize import _coarse_to_fine
    from ofg_jax.regularizers import grad_loss_gradient
    from ofg_jax.warp import warp, warp_and_slopes

    def level(moving, fixed, start, count, *_):
        ncc_gradient = ncc_gradient_to(fixed, window=5)
        opt = torch_adam(0.2, amsgrad=False)

        def gradient(disp):
            warped, slopes = warp_and_slopes(moving, disp)
            g = -ncc_gradient(warped, None)
            g = jnp.stack([g * slope for slope in slopes], -1)
            if kind == "smoothed":
                g = g + 2.0 * grad_loss_gradient(disp)
            return _blur(g, grad_sigma) if grad_sigma else g

        def step(_, carry):
            disp, state = carry
            update, state = opt.update(gradient(disp), state, disp)
            update = _blur(update, sigma) if sigma else update
            if kind == "compositive":
                return update + warp(disp, update), state
            return disp + update, state

        return jax.lax.fori_loop(0, count, step, (start, opt.init(start)))[0]

    return lambda moving, fixed: _coarse_to_fine(moving, fixed, (4, 2, 1), (100, 50, 20),
                                                 level)


def prepare(folder: str) -> dict[str, Any]:
    """The pair's fixed image and its moving image through the affine, on the
    fixed grid (the command's affine and resampling)."""
    from ofg_jax.registration import affine as affine_lib
    from ofg_jax.registration.scans import resample_volume
    from ofg_jax.registration.transforms import read_volume
    fixed = read_volume(os.path.join(folder, "fixed.nii.gz"), "fixed image")
    moving = read_volume(os.path.join(folder, "moving.nii.gz"), "moving image")
    matrix = affine_lib.register_affine(moving.array, fixed.array,
                                        moving_affine=moving.affine,
                                        fixed_affine=fixed.affine)
    return {"moving": resample_volume(moving, fixed.grid, matrix), "fixed": fixed,
            "matrix": matrix}


def run(setting, pair: dict[str, Any], folder: str, timing: bool) -> dict[str, float]:
    """The scores (and seconds) of one setting on one prepared pair."""
    import jax
    from experiments import brain_pairs
    from ofg_jax.optimize import optimize_displacement
    from ofg_jax.registration.transforms import field_transform
    if isinstance(setting, tuple):
        fn = _prototype(setting[1], **setting[2])
    else:
        fn = lambda m, f, options=setting: optimize_displacement(m, f, **options)
    compiled = jax.jit(fn)
    fixed = pair["fixed"]
    disp = np.asarray(compiled(pair["moving"], fixed.array))
    field = field_transform(disp, fixed.grid, fixed).field_lps
    scores = brain_pairs.score(folder, field, pair["matrix"])
    if timing:
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            jax.block_until_ready(compiled(pair["moving"], fixed.array))
            seconds.append(time.perf_counter() - start)
        scores["optimisation_seconds"] = float(np.median(seconds))
    return scores


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs-dir", required=True)
    parser.add_argument("--data", help="the subject's .npz, to build missing pairs")
    parser.add_argument("--pairs", default=",".join(TUNING_PAIRS))
    parser.add_argument("--settings", help="names of SETTINGS, '|'-separated; "
                        "default: all")
    parser.add_argument("--timing", action="store_true")
    parser.add_argument("--steps", help="steps per level for every setting of the "
                        "library (not the prototypes), e.g. 0,0,20 to time the last "
                        "level alone; default: each setting's own")
    parser.add_argument("--out", required=True, help="JSON of the results")
    args = parser.parse_args(argv)
    from experiments import brain_pairs
    names = args.pairs.split(",")
    if any(name.startswith("subject_to_mni") for name in names):
        parser.error("the subject_to_mni pairs are the reported ones, not for tuning")
    chosen = args.settings.split("|") if args.settings else list(SETTINGS)
    unknown = [c for c in chosen if c not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}")
    settings = {name: SETTINGS[name] for name in chosen}
    if args.steps:
        try:
            steps = tuple(int(n) for n in args.steps.split(","))
        except ValueError:
            parser.error(f"--steps must be integers separated by commas, got {args.steps!r}")
        settings = {name: setting if isinstance(setting, tuple) else {**setting, "steps": steps}
                    for name, setting in settings.items()}
    missing = [n for n in names if not os.path.isdir(os.path.join(args.pairs_dir, n))]
    if missing:
        if not args.data:
            parser.error(f"pairs {missing} are not in {args.pairs_dir}; give --data")
        brain_pairs.make_pairs(args.data, args.pairs_dir, missing)
    rows = []
    for name in names:
        folder = os.path.join(args.pairs_dir, name)
        pair = prepare(folder)
        for setting in chosen:
            scores = run(settings[setting], pair, folder, args.timing)
            rows.append({"setting": setting, "pair": name, **scores})
            print(f"{name:20s} {setting}: Dice {scores['dice']:.4f}, "
                  f"{scores['det_le0_brain_pct']:.4f} % det <= 0"
                  + (f", error {scores['error_mm']:.2f} mm" if "error_mm" in scores
                     else ""), flush=True)
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "steps": args.steps, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
