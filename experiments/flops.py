"""The networks' share of the CPU's peak: XLA's FLOPs over measured seconds.

The peak is that of a large float32 matrix product (``--matmul`` square,
jitted, best of ``--repeats``): the fastest FLOP rate XLA reaches on this
machine. Each network's forward+backward (the gradient of ``sum(flow * r)`` in
its parameters, ``train=False``) at ``--shape`` is compiled ahead of time and
timed: the median of ``--repeats`` calls after a warm-up call, wall and CPU
(this process, all threads). Its FLOPs are XLA's cost analysis of the same
function with ``conv_impl="xla"`` (compiled, never run): the CPU formulation of
the convolutions computes the same sums in loops over chunks, whose bodies
XLA's cost analysis counts once, not once per iteration.

    python -m experiments.flops --shape 160,192,224 --models voxelmorph \\
        --repeats 3 [--json out.json]

Only ``ofg_jax.models.create`` and ``jax`` are used, so the script runs
unchanged against a checkout of an older version (``PYTHONPATH=<checkout>``).
"""

import argparse
import json
import statistics
import time
from typing import Optional, Sequence


def _timed(call, repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``repeats`` calls after one warm-up call."""
    call()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def _flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis.get("flops", float("nan")))


def matmul_peak(n: int, repeats: int) -> dict:
    """GFLOP/s of a jitted ``(n, n) @ (n, n)`` float32 product, best of ``repeats``."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    compiled = jax.jit(jnp.dot).lower(a, a).compile()
    jax.block_until_ready(compiled(a, a))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(a, a))
        best = min(best, time.perf_counter() - start)
    return {"n": n, "seconds": best, "gflops": 2 * n ** 3 / best / 1e9}


def network(name: str, shape: Sequence[int], repeats: int) -> dict:
    """FLOPs and seconds of ``name``'s forward+backward at ``shape``."""
    import jax
    import jax.numpy as jnp
    from ofg_jax import models

    key = jax.random.PRNGKey(0)
    model = models.create(name, tuple(shape))
    x = jax.random.uniform(jax.random.fold_in(key, 1), (1, *shape, 2), jnp.float32)
    r = jax.random.normal(jax.random.fold_in(key, 2), (1, *shape, 3), jnp.float32)
    variables = jax.jit(model.init)(key, x)
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}

    def gradient(model):
        def loss(params, x):
            return jnp.sum(model.apply({"params": params, **rest}, x, train=False) * r)
        return jax.jit(jax.grad(loss)).lower(params, x).compile()

    start = time.perf_counter()
    compiled = gradient(model)
    compile_s = time.perf_counter() - start
    wall, cpu = _timed(lambda: jax.block_until_ready(compiled(params, x)), repeats)
    flops = _flops(gradient(models.create(name, tuple(shape), conv_impl="xla")))
    return {"model": name, "shape": list(shape), "flops": flops, "compile_s": compile_s,
            "wall_s": wall, "cpu_s": cpu, "gflops_wall": flops / wall / 1e9}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="160,192,224", help="volume size D,H,W")
    parser.add_argument("--models", default="voxelmorph", help="comma-separated names")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls (median)")
    parser.add_argument("--matmul", type=int, default=4096, help="size of the product")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)
    try:
        shape = tuple(int(n) for n in args.shape.split(","))
    except ValueError:
        parser.error(f"--shape must be three integers, got {args.shape!r}")
    if len(shape) != 3 or min(shape) < 1 or args.repeats < 1 or args.matmul < 1:
        parser.error("--shape needs three positive integers; --repeats and --matmul >= 1")
    import jax
    peak = matmul_peak(args.matmul, max(args.repeats, 5))
    print(f"{jax.devices()[0].device_kind}: {args.matmul}^2 float32 matmul "
          f"{peak['gflops']:.1f} GFLOP/s (best of {max(args.repeats, 5)})", flush=True)
    record = {"peak": peak, "networks": []}
    print("| network | GFLOP (XLA, conv_impl=xla) | wall s | CPU s | GFLOP/s (wall) "
          "| of the matmul |\n|---|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        result = network(name, shape, args.repeats)
        record["networks"].append(result)
        print(f"| {name} | {result['flops'] / 1e9:.0f} | {result['wall_s']:.2f} | "
              f"{result['cpu_s']:.2f} | {result['gflops_wall']:.1f} | "
              f"{result['gflops_wall'] / peak['gflops']:.1%} |", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(record, f, indent=2)
    return record


if __name__ == "__main__":
    main()
