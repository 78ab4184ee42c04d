"""Forward and forward+backward times of the registration networks.

Times, in one process so that the numbers share the machine's conditions:
  * each JAX network (``ofg_jax.models``), jitted, forward (``train=False``) and
    forward+backward (gradient of ``sum(flow * r)`` for a fixed random ``r``,
    with respect to all parameters; dropout active for the transformers);
  * VoxelMorph with XLA's own 3D convolution (``conv_impl="xla"``) for contrast;
  * the PyTorch networks of the baselines (``experiments.torch_baseline``,
    ``experiments.torch_networks``): same architectures and parameter counts.
Repetitions are interleaved across the entries and the median (and min) of
``--repeats`` runs after one warm-up run is reported.

Usage:
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python -m experiments.bench_models \\
      --entries jax:voxelmorph,torch:voxelmorph --size 160x192x224 --repeats 3

The glibc tunable makes malloc back large buffers with transparent huge pages;
without it XLA:CPU and PyTorch both pay a page fault per 4 KiB on every fresh
large buffer, which on a small VM costs more than the arithmetic of many ops.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

from experiments.timing import interleaved_seconds, peak_rss_mb

ENTRIES = ("jax:voxelmorph", "jax-xla:voxelmorph", "jax:vitvnet", "jax:transmorph",
           "torch:voxelmorph", "torch:vitvnet", "torch:transmorph")


def _parse_size(text):
    size = tuple(int(n) for n in text.lower().split("x"))
    if len(size) != 3:
        raise argparse.ArgumentTypeError(f"size must look like 160x192x224, got {text!r}")
    return size


# ---------------------------------------------------------------------------
# JAX


def make_jax_entry(name, size, conv_impl="auto", overrides=None):
    """Returns ``(forward, forward_backward, n_params)`` zero-argument callables."""
    import jax
    import jax.numpy as jnp
    from ofg_jax import models

    model = models.create(name, size, conv_impl=conv_impl, **(overrides or {}))
    key = jax.random.PRNGKey(0)
    x = jax.random.uniform(jax.random.fold_in(key, 1), (1, *size, 2), jnp.float32)
    r = jax.random.normal(jax.random.fold_in(key, 2), (1, *size, 3), jnp.float32)
    variables = jax.jit(model.init)(key, x)
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    mutable = list(rest) or False  # ViT-V-Net's BatchNorm statistics

    @jax.jit
    def forward(params, x):
        return model.apply({"params": params, **rest}, x, train=False)

    @jax.jit
    def forward_backward(params, x, r, rng):
        def loss(params):
            out = model.apply({"params": params, **rest}, x, train=True,
                              rngs={"dropout": rng}, mutable=mutable)
            flow = out[0] if mutable else out
            return jnp.sum(flow * r)
        return jax.grad(loss)(params)

    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    rng = jax.random.fold_in(key, 3)
    return (lambda: jax.block_until_ready(forward(params, x)),
            lambda: jax.block_until_ready(forward_backward(params, x, r, rng)),
            n_params)


# ---------------------------------------------------------------------------
# PyTorch


def make_torch_entry(name, size, threads, overrides=None):
    """Returns ``(forward, forward_backward, n_params)`` of a PyTorch baseline network."""
    import torch
    from experiments import torch_baseline

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = torch_baseline.network(name, size, **(overrides or {}))
    x = torch.rand(1, 2, *size)
    r = torch.randn(1, 3, *size)

    def forward():
        net.eval()
        with torch.no_grad():
            net.predict(x)

    def forward_backward():
        net.train()
        net.zero_grad(set_to_none=True)
        (net.predict(x) * r).sum().backward()

    return forward, forward_backward, sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", default="jax:voxelmorph,torch:voxelmorph",
                        help=f"comma-separated, from {', '.join(ENTRIES)}")
    parser.add_argument("--size", type=_parse_size, default=(160, 192, 224))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="PyTorch intra-op threads")
    parser.add_argument("--transmorph-window", type=_parse_size, default=None,
                        help="window_size override for TransMorph, e.g. 3x3x3")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    entries = [e.strip() for e in args.entries.split(",") if e.strip()]
    unknown = [e for e in entries if e not in ENTRIES]
    if unknown:
        parser.error(f"unknown entries {unknown}; valid: {', '.join(ENTRIES)}")

    runs = {}
    for entry in entries:
        kind, name = entry.split(":")
        start = time.perf_counter()
        overrides = {}
        if name == "transmorph" and args.transmorph_window:
            overrides["window_size"] = args.transmorph_window
        if kind == "torch":
            fwd, fwd_bwd, n_params = make_torch_entry(name, args.size, args.threads,
                                                      overrides)
        else:
            fwd, fwd_bwd, n_params = make_jax_entry(
                name, args.size, "xla" if kind == "jax-xla" else "auto", overrides)
        fwd()
        fwd_bwd()  # warm-up: compilation (JAX) or allocator warm-up (PyTorch)
        runs[entry] = dict(fwd=fwd, fwd_bwd=fwd_bwd, params=n_params,
                           setup_s=time.perf_counter() - start)
        print(f"{entry}: set up and warmed up in {runs[entry]['setup_s']:.1f} s",
              file=sys.stderr, flush=True)

    calls = {}
    for entry, run in runs.items():
        calls[f"{entry}/fwd"], calls[f"{entry}/fwd_bwd"] = run["fwd"], run["fwd_bwd"]
    times = interleaved_seconds(calls, args.repeats, warmup=0)[1]

    size = "x".join(map(str, args.size))
    print(f"\n{datetime.date.today()}, {platform.node() or 'host'}: {os.cpu_count()} CPUs, "
          f"size {size}, median (min) of {args.repeats}, seconds; "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}\n")
    print("| network | framework | parameters | forward | forward+backward |")
    print("|---|---|---:|---:|---:|")
    results = []
    for entry, run in runs.items():
        kind, name = entry.split(":")
        fwd, fb = times[f"{entry}/fwd"], times[f"{entry}/fwd_bwd"]
        framework = {"jax": "JAX", "jax-xla": "JAX, XLA conv", "torch": "PyTorch"}[kind]
        print(f"| {name} | {framework} | {run['params']:,} | {statistics.median(fwd):.2f} "
              f"({min(fwd):.2f}) | {statistics.median(fb):.2f} ({min(fb):.2f}) |")
        results.append(dict(entry=entry, params=run["params"], forward_s=fwd,
                            forward_backward_s=fb, setup_s=run["setup_s"]))
    print(f"\npeak resident memory of the process: {peak_rss_mb() / 1024:.1f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(size=args.size, repeats=args.repeats, results=results,
                           date=str(datetime.date.today())), f, indent=1)


if __name__ == "__main__":
    main()
