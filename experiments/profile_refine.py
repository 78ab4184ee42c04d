"""Where the time of one ``refine`` iteration goes.

One inner iteration of ``ofg_jax.refine`` evaluates the gradient of the
registration energy ``-NCC(fixed, warp(moving, disp)) + Grad(disp)`` and applies
the optimiser update. This script jits and times each part alone, on one pair of
random images and a random field (2 voxels standard deviation):

- ``warp``: value and gradient of ``sum(warp(moving, disp) * r)`` in ``disp``;
- ``ncc``: value and gradient of ``ncc_to(fixed)`` in the warped image (box sums
  of three maps of the warped image and their transposes; the fixed image's two
  are computed once, outside, as in ``refine``);
- ``grad_loss``: value and gradient of the smoothness term;
- ``energy``: value and gradient of the whole energy (one iteration without the
  update), to compare with the sum of the parts;
- ``refine_per_step``: ``refine`` with ``--steps`` iterations, divided by the steps.

Median of ``--repeats`` interleaved rounds after one warm-up round:

    python -m experiments.profile_refine --shape 80,96,112 --repeats 5 \
        [--roofline --bandwidth-gbs 4800] [--json out.json]

``--roofline`` adds the bytes each part reads and writes, by XLA's cost analysis
of the compiled function (``bytes accessed``), and the bandwidth that its time
implies; ``refine_per_step`` is then one iteration of the inner loop (the
energy's gradient and the amsgrad update, compiled alone). With
``--bandwidth-gbs`` (the memory's peak, e.g. 4800 for an H200) also the
fraction of it, the roofline of a memory-bound loop.
"""

import argparse
import functools
from typing import Optional, Sequence

from experiments.timing import device_description, interleaved_seconds, parse_shape


def profile(shape: Sequence[int], steps: int, repeats: int) -> dict:
    """Median seconds of each part (module docstring), keyed by part name."""
    import jax
    import jax.numpy as jnp
    from ofg_jax import grad_loss, ncc_to, refine, registration_energy, warp

    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    moving = jax.random.uniform(keys[0], tuple(shape))
    fixed = jax.random.uniform(keys[1], tuple(shape))
    disp = 2.0 * jax.random.normal(keys[2], (*shape, len(shape)))
    r = jax.random.normal(keys[3], tuple(shape))
    similarity = ncc_to(fixed)
    warped = warp(moving, disp)

    parts = {
        "warp": (jax.value_and_grad(lambda d: jnp.sum(warp(moving, d) * r)), disp),
        "ncc": (jax.value_and_grad(similarity), warped),
        "grad_loss": (jax.value_and_grad(grad_loss), disp),
        "energy": (jax.value_and_grad(
            lambda d: registration_energy(moving, fixed, d)), disp),
        "refine_per_step": (functools.partial(refine, moving, fixed, steps=steps), disp),
    }
    calls = {}
    for name, (fn, arg) in parts.items():
        compiled = jax.jit(fn).lower(arg).compile()
        calls[name] = lambda c=compiled, a=arg: jax.block_until_ready(c(a))
    medians = interleaved_seconds(calls, repeats, warmup=1)[0]
    medians["refine_per_step"] /= steps
    return medians


def bytes_accessed(shape: Sequence[int]) -> dict:
    """XLA's estimate of the bytes each part reads and writes per call."""
    import jax
    import jax.numpy as jnp
    import optax
    from ofg_jax import grad_loss, ncc_to, registration_energy, torch_adam, warp

    moving = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
    disp = jax.ShapeDtypeStruct((*shape, len(shape)), jnp.float32)
    opt = torch_adam(0.1)

    def one_step(moving, fixed, d, state):  # one iteration of refine's loop
        grads = jax.grad(lambda d: registration_energy(moving, fixed, d))(d)
        updates, state = opt.update(grads, state, d)
        return optax.apply_updates(d, updates), state

    r = moving
    parts = {
        "warp": (jax.value_and_grad(lambda m, d, r: jnp.sum(warp(m, d) * r), 1),
                 (moving, disp, r)),
        "ncc": (jax.value_and_grad(lambda f, w: ncc_to(f)(w), 1), (moving, moving)),
        "grad_loss": (jax.value_and_grad(grad_loss), (disp,)),
        "energy": (jax.value_and_grad(
            lambda m, f, d: registration_energy(m, f, d), 2), (moving, moving, disp)),
        "refine_per_step": (one_step, (moving, moving, disp,
                                       jax.eval_shape(opt.init, disp))),
    }
    out = {}
    for name, (fn, args) in parts.items():
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        out[name] = float(cost.get("bytes accessed", float("nan")))
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="80,96,112", help="volume size D,H,W")
    parser.add_argument("--steps", type=int, default=10,
                        help="iterations of the timed refine call")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--roofline", action="store_true",
                        help="also the bytes moved per part and the bandwidth they imply")
    parser.add_argument("--bandwidth-gbs", type=float,
                        help="the memory's peak bandwidth in GB/s, for the roofline")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)
    shape = parse_shape(args.shape)
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1")
    medians = profile(shape, args.steps, args.repeats)
    print(f"refine iteration parts, {'x'.join(map(str, shape))}, median of "
          f"{args.repeats}; {device_description()}")
    if not args.roofline:
        print("| part | ms |\n|---|---:|")
        for name, seconds in medians.items():
            print(f"| {name} | {seconds * 1e3:.1f} |")
    else:
        moved = bytes_accessed(shape)
        peak = f" | of {args.bandwidth_gbs:.0f} GB/s" if args.bandwidth_gbs else ""
        print(f"| part | ms | MB moved (XLA) | GB/s{peak} |\n|---|---:|---:|---:|"
              + ("---:|" if peak else ""))
        for name, seconds in medians.items():
            gbs = moved[name] / seconds / 1e9
            frac = f" | {gbs / args.bandwidth_gbs:.1%}" if args.bandwidth_gbs else ""
            print(f"| {name} | {seconds * 1e3:.1f} | {moved[name] / 1e6:.0f} | "
                  f"{gbs:.0f}{frac} |")
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump({"shape": list(shape), "device": device_description(),
                       "seconds": medians,
                       "bytes": moved if args.roofline else None}, f, indent=2)
    return medians


if __name__ == "__main__":
    main()
