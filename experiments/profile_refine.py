"""Where the time of one ``refine`` iteration goes, against the memory's bandwidth.

One inner iteration of ``ofg_jax.refine`` takes the gradient of the registration
energy ``-NCC(fixed, warp(moving, disp)) + Grad(disp)`` (written out, not by
autodiff: ``ofg_jax.refine``'s inner energy) and applies the amsgrad update. On
one pair of random images and a random field (2 voxels standard deviation),
every array an argument of the compiled function (none is a constant that XLA
could fold), this script times:

- ``warp``: ``warp_and_slopes`` (the warped image and its three slopes);
- ``ncc``: ``ncc_gradient_to(fixed)`` of the warped image; this includes the
  fixed image's window sums, which ``refine`` computes once per call;
- ``grad_loss``: ``grad_loss_gradient``;
- ``optimizer``: the amsgrad update of a field and its three moments;
- ``refine_step``: one iteration inside ``refine``: ``(T(steps) - T(1)) /
  (steps - 1)`` for ``jax.jit(refine)`` with ``steps`` and with 1 iteration;
- ``refine_per_step``: ``T(steps) / steps`` (the per-call work shared out).

Median of ``--repeats`` interleaved rounds after one warm-up round, in wall
seconds and in this process's CPU seconds (all threads: less sensitive than
wall time to other jobs on a shared machine).

    python -m experiments.profile_refine --shape 80,96,112 --repeats 5 \\
        [--roofline [--bandwidth-gbs 4800]] [--json out.json]

``--roofline`` adds the bytes each part reads and writes by XLA's cost analysis
of its compiled function (``bytes accessed``), per voxel, and the bandwidth its
time implies. The bytes of one iteration are those of the inner energy's
gradient and the update compiled alone, less those of the fixed image's window
sums (which that function computes and ``refine`` does not, per iteration).
The memory's bandwidth is measured (a streaming ``2 * x`` of a float32 array of
the field's size and of 1 GiB, read + write) unless ``--bandwidth-gbs`` gives
it (e.g. 4800 for an H200). The floor of an iteration is ``FLOOR_BYTES_PER_VOXEL``
moved once at that bandwidth.
"""

import argparse
import functools
import json
import statistics
import time
from typing import Callable, Optional, Sequence

from experiments.timing import device_description, parse_shape

# What one iteration must read and write at least, per voxel: the field and the
# optimiser's three moments read and written (4 x 3 float32, twice), and the
# moving image, the fixed image and its two window sums read once.
FLOOR_BYTES_PER_VOXEL = 4 * 3 * 4 * 2 + 4 * 4


def _cpu_and_wall(calls: dict[str, Callable[[], object]], repeats: int) -> dict:
    """``{name: (median wall s, median CPU s)}`` of rounds calling each in turn."""
    wall = {name: [] for name in calls}
    cpu = {name: [] for name in calls}
    for round_ in range(repeats + 1):
        for name, call in calls.items():
            w, c = time.perf_counter(), time.process_time()
            call()
            if round_:  # the first round warms up
                wall[name].append(time.perf_counter() - w)
                cpu[name].append(time.process_time() - c)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name]))
            for name in calls}


def _inputs(shape: Sequence[int]):
    import jax
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    moving = jax.random.uniform(keys[0], tuple(shape))
    fixed = jax.random.uniform(keys[1], tuple(shape))
    disp = 2.0 * jax.random.normal(keys[2], (*shape, len(shape)))
    return moving, fixed, disp


def _parts(steps: int) -> dict:
    """``{name: (function, argument names)}`` of the parts in the module docstring."""
    import optax
    from ofg_jax import refine, torch_adam
    from ofg_jax.ncc import ncc_gradient_to
    from ofg_jax.regularizers import grad_loss_gradient
    from ofg_jax.warp import warp, warp_and_slopes

    opt = torch_adam(0.1)

    def update(d, g, state):
        updates, state = opt.update(g, state, d)
        return optax.apply_updates(d, updates), state

    return {
        "warp": (warp_and_slopes, ("moving", "disp")),
        "ncc": (lambda f, m, d: ncc_gradient_to(f)(warp(m, d)), ("fixed", "moving", "disp")),
        "grad_loss": (grad_loss_gradient, ("disp",)),
        "optimizer": (update, ("disp", "disp", "state")),
        "refine_1": (functools.partial(refine, steps=1), ("moving", "fixed", "disp")),
        "refine_steps": (functools.partial(refine, steps=steps), ("moving", "fixed", "disp")),
    }


def profile(shape: Sequence[int], steps: int, repeats: int) -> dict:
    """``{part: (wall s, CPU s)}`` (module docstring), medians of ``repeats``."""
    import jax
    from ofg_jax import torch_adam
    moving, fixed, disp = _inputs(shape)
    arrays = {"moving": moving, "fixed": fixed, "disp": disp,
              "state": torch_adam(0.1).init(disp)}
    calls = {}
    for name, (fn, names) in _parts(steps).items():
        args = [arrays[n] for n in names]
        compiled = jax.jit(fn).lower(*args).compile()
        calls[name] = lambda c=compiled, a=args: jax.block_until_ready(c(*a))
    times = _cpu_and_wall(calls, repeats)
    one, many = times.pop("refine_1"), times.pop("refine_steps")
    times["refine_step"] = tuple((b - a) / (steps - 1) for a, b in zip(one, many))
    times["refine_per_step"] = tuple(t / steps for t in many)
    return times


def bytes_accessed(shape: Sequence[int]) -> dict:
    """XLA's estimate of the bytes each part reads and writes per call."""
    import jax
    import jax.numpy as jnp
    import optax
    from ofg_jax import torch_adam
    from ofg_jax.ncc import box_sum
    from ofg_jax.refine import _inner_energy_fn

    image = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
    field = jax.ShapeDtypeStruct((*shape, len(shape)), jnp.float32)
    opt = torch_adam(0.1)

    def one_step(moving, fixed, d, state):  # one iteration of refine's loop
        energy = _inner_energy_fn(moving, fixed, 1.0, "ncc", 9, "l2")
        updates, state = opt.update(jax.grad(energy)(d), state, d)
        return optax.apply_updates(d, updates), state

    def cost(fn, *args):
        analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
        return float(analysis.get("bytes accessed", float("nan")))

    shapes = {"moving": image, "fixed": image, "disp": field,
              "state": jax.eval_shape(opt.init, field)}
    out = {name: cost(fn, *[shapes[n] for n in names])
           for name, (fn, names) in _parts(2).items() if not name.startswith("refine")}
    fixed_sums = cost(lambda f: box_sum(jnp.stack([f, f * f], -1), 9), image)
    out["refine_step"] = cost(one_step, image, image, field, shapes["state"]) - fixed_sums
    return out


def copy_bandwidth_gbs(nbytes: int, repeats: int = 5) -> float:
    """Read + write GB/s of a jitted ``2 * x`` over ``nbytes`` of float32, best of repeats."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones((nbytes // 4,), jnp.float32)
    double = jax.jit(lambda x: 2 * x).lower(x).compile()
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        jax.block_until_ready(double(x))
        best = min(best, time.perf_counter() - start)
    return 2 * x.size * 4 / best / 1e9


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="80,96,112", help="volume size D,H,W")
    parser.add_argument("--steps", type=int, default=10,
                        help="iterations of the timed refine call (at least 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--roofline", action="store_true",
                        help="also the bytes moved per part and the bandwidth they imply")
    parser.add_argument("--bandwidth-gbs", type=float,
                        help="the memory's bandwidth in GB/s (default: measured)")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)
    try:
        shape = parse_shape(args.shape)
    except ValueError as err:
        parser.error(str(err))
    if args.steps < 2 or args.repeats < 1:
        parser.error("--steps must be >= 2 and --repeats >= 1")
    voxels = 1
    for n in shape:
        voxels *= n
    times = profile(shape, args.steps, args.repeats)
    record = {"shape": list(shape), "device": device_description(), "steps": args.steps,
              "repeats": args.repeats, "wall_s": {k: v[0] for k, v in times.items()},
              "cpu_s": {k: v[1] for k, v in times.items()}}
    print(f"refine iteration parts, {'x'.join(map(str, shape))}, median of "
          f"{args.repeats}; {device_description()}")
    if not args.roofline:
        print("| part | wall ms | CPU ms |\n|---|---:|---:|")
        for name, (wall, cpu) in times.items():
            print(f"| {name} | {wall * 1e3:.1f} | {cpu * 1e3:.1f} |")
    else:
        moved = bytes_accessed(shape)
        if args.bandwidth_gbs:
            bandwidth = {"given": args.bandwidth_gbs}
        else:
            bandwidth = {"field": copy_bandwidth_gbs(voxels * len(shape) * 4),
                         "1 GiB": copy_bandwidth_gbs(2 ** 30)}
        peak = max(bandwidth.values())
        floor_s = FLOOR_BYTES_PER_VOXEL * voxels / (peak * 1e9)
        record.update(bytes=moved, bandwidth_gbs=bandwidth, floor_s=floor_s)
        print("| part | wall ms | CPU ms | bytes/voxel (XLA) | GB/s at wall time |\n"
              "|---|---:|---:|---:|---:|")
        for name, (wall, cpu) in times.items():
            per_voxel = moved.get(name, moved["refine_step"] if name == "refine_per_step"
                                  else float("nan")) / voxels
            print(f"| {name} | {wall * 1e3:.1f} | {cpu * 1e3:.1f} | {per_voxel:.0f} | "
                  f"{per_voxel * voxels / wall / 1e9:.1f} |")
        step_wall = times["refine_step"][0]
        print("copy bandwidth (read + write), GB/s: "
              + ", ".join(f"{k} {v:.1f}" for k, v in bandwidth.items()))
        print(f"floor of an iteration: {FLOOR_BYTES_PER_VOXEL} bytes/voxel at "
              f"{peak:.1f} GB/s = {floor_s * 1e3:.2f} ms; refine_step is "
              f"{step_wall / floor_s:.1f}x the floor (wall), "
              f"{times['refine_step'][1] / floor_s:.1f}x (CPU)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return times


if __name__ == "__main__":
    main()
