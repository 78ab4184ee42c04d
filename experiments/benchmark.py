"""Training-step throughput of ofg_jax (XLA) against the eager PyTorch baseline.

For each framework, in its own subprocess (so that peak memories are separate),
times on one synthetic batch: the unsupervised training step, the OFG training
step, ``refine`` alone and the network forward pass. Every timing is the median
over ``--repeats`` calls after ``--warmup`` untimed calls, the four functions
called in turn (round-robin) so that a slow spell of a shared machine slows them
alike; JAX outputs are blocked on. JAX compile time is reported separately: the
ahead-of-time ``lower().compile()`` of the four functions plus, for each of
the two train steps, ``create_train_state`` (whose time is almost all the
compilation of the initialiser).

    python -m experiments.benchmark --shape 64,64,64 --inner-steps 10 \\
        --repeats 3 --out bench_64.json [--torch-compile] [--breakdown] \\
        [--torch-repeats 1 --torch-warmup 0]

JSON: ``{"shape", "device", "model", "batch", "inner_steps", "repeats",
"jax": {...}, "torch": {...}[, "torch_compile": {...}][, "jax_breakdown": {...}]}``
where each framework entry holds ``unsupervised_step_s``, ``ofg_step_s``,
``refine_s``, ``forward_s``, ``compile_s`` and ``peak_mb`` (process peak RSS on
CPU, peak device memory on GPU), or ``{"error": ...}`` when it could not run.
With several ``--models`` the file holds a list of such records.
"""

import argparse
import collections
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

from experiments.timing import (CompiledStep, cpu_description, interleaved_seconds,
                                parse_shape, peak_rss_mb, synthetic_batch)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "default.py")
TIMED_KEYS = ("unsupervised_step_s", "ofg_step_s", "refine_s", "forward_s")
RESULT_KEYS = TIMED_KEYS + ("compile_s", "peak_mb")
FRAMEWORKS = ("jax", "torch", "torch_compile")
INNER_LR = 0.1


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# JAX.


def jax_config(model_name: str, mode: str, inner_steps: int, batch: int):
    """The reference training config (``configs/default.py``) for ``mode``."""
    from ofg_jax import config as config_lib
    return config_lib.with_overrides(config_lib.load(DEFAULT_CONFIG), {
        "model.name": model_name, "train.mode": mode, "train.batch_size": batch,
        "ofg.steps": inner_steps, "ofg.learning_rate": INNER_LR})


def run_jax(model_name: str, shape, batch: int, inner_steps: int, repeats: int,
            warmup: int, breakdown: bool) -> dict:
    """Times the jitted ``ofg_jax`` train steps, ``refine`` and the forward pass."""
    import jax
    import jax.numpy as jnp
    from ofg_jax import refine

    device = jax.devices()[0]
    moving, fixed = (jax.device_put(x) for x in synthetic_batch(shape, batch))
    data = {"moving": moving, "fixed": fixed}
    calls, compile_times = {}, {}
    for mode, key in (("unsupervised", "unsupervised_step_s"), ("ofg", "ofg_step_s")):
        calls[key] = CompiledStep(jax_config(model_name, mode, inner_steps, batch),
                                  shape, data)
        compile_times[key] = calls[key].compile_seconds
    ofg_step = calls["ofg_step_s"]
    model = ofg_step.model
    initial_variables = jax.tree.map(jnp.copy, ofg_step.state.variables)

    pred_shape = (batch, *shape, len(shape))
    refine_batch = jax.jit(jax.vmap(functools.partial(
        refine, steps=inner_steps, learning_rate=INNER_LR)))
    disp = jnp.zeros(pred_shape, jnp.float32)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    pair = jnp.stack([moving, fixed], axis=-1)
    for key, fn, args in (("refine_s", refine_batch, (moving, fixed, disp)),
                          ("forward_s", forward, (initial_variables, pair))):
        start = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_times[key] = time.perf_counter() - start
        calls[key] = lambda c=compiled, a=args: jax.block_until_ready(c(*a))

    log(f"jax: timing {', '.join(calls)}, interleaved")
    result, times, _ = interleaved_seconds(calls, repeats, warmup)
    result["compile_s"] = sum(compile_times.values())
    result["compile_breakdown_s"] = compile_times
    result["ofg_over_unsupervised"] = result["ofg_step_s"] / result["unsupervised_step_s"]
    result["times_s"] = times
    result["device"] = f"{device.platform}: {device.device_kind}"
    result["peak_mb"] = jax_peak_mb(device)
    if breakdown:
        result["breakdown"] = jax_step_breakdown(model, ofg_step.state.params, moving,
                                                 fixed, inner_steps, repeats, warmup)
    return result


def jax_peak_mb(device) -> float:
    """Peak device memory on an accelerator, the process's peak RSS on CPU."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2 ** 20
    return peak_rss_mb()


def jax_step_breakdown(model, params, moving, fixed, inner_steps: int, repeats: int,
                       warmup: int) -> dict:
    """Times the parts of an OFG step, each jitted alone.

    ``forward``: prediction; ``forward_backward``: loss and parameter gradients
    with a constant target (the step without ``refine``); ``refine``: the inner
    loop on a given prediction; ``optimizer_update``: the Adam (amsgrad) update.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from ofg_jax import grad_loss, refine, torch_adam

    pair = jnp.stack([moving, fixed], axis=-1)
    apply = lambda p: model.apply({"params": p}, pair, train=False)
    pred = jax.jit(apply)(params)
    target = pred + 0.1

    def loss(p):
        out = apply(p)
        return jnp.mean((out - target) ** 2) + 0.02 * jnp.mean(jax.vmap(grad_loss)(out))

    tx = torch_adam(1e-4)
    opt_state = tx.init(params)
    grads = jax.grad(loss)(params)

    def update(g, s, p):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    parts = {
        "forward": (jax.jit(apply), (params,)),
        "forward_backward": (jax.jit(jax.value_and_grad(loss)), (params,)),
        "refine": (jax.jit(jax.vmap(functools.partial(
            refine, steps=inner_steps, learning_rate=INNER_LR))), (moving, fixed, pred)),
        "optimizer_update": (jax.jit(update), (grads, opt_state, params)),
    }
    calls = {}
    for name, (fn, args) in parts.items():
        compiled = fn.lower(*args).compile()
        calls[name] = lambda c=compiled, a=args: jax.block_until_ready(c(*a))
    return interleaved_seconds(calls, repeats, warmup)[0]


# ---------------------------------------------------------------------------
# PyTorch.


def run_torch(model_name: str, shape, batch: int, inner_steps: int, repeats: int,
              warmup: int, compile_model: bool) -> dict:
    """Times the eager PyTorch baseline.

    With ``compile_model`` the network and the inner energy (warp, NCC, Grad) are
    ``torch.compile``-d; the optimisers and the inner loop stay eager. Its
    ``compile_s`` is the excess of the first calls over the medians.
    """
    import torch
    from experiments import torch_baseline as tb

    if model_name != "voxelmorph":
        raise ValueError(f"the PyTorch baseline has only voxelmorph, not {model_name!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = tb.VoxelMorph().to(device)
    optimizer = tb.make_optimizer(model)
    moving, fixed = (torch.from_numpy(x)[:, None].to(device)
                     for x in synthetic_batch(shape, batch))
    disp = torch.zeros((batch, len(shape), *shape), device=device)
    pair = torch.cat([moving, fixed], dim=1)
    net, energy = model, tb.registration_energy
    if compile_model:
        net, energy = torch.compile(model), torch.compile(tb.registration_energy)
    refine_kwargs = dict(steps=inner_steps, lr=INNER_LR, energy=energy)

    def unsupervised():
        tb.train_step(net, optimizer, moving, fixed, mode="unsupervised")
        sync()

    def ofg():
        tb.train_step(net, optimizer, moving, fixed, mode="ofg", **refine_kwargs)
        sync()

    def refine_only():
        tb.refine(moving, fixed, disp, **refine_kwargs)
        sync()

    def forward():
        with torch.no_grad():
            net(pair)
        sync()

    name = "torch_compile" if compile_model else "torch"
    log(f"{name}: timing {', '.join(TIMED_KEYS)}, interleaved")
    result, times, first_call = interleaved_seconds(
        dict(zip(TIMED_KEYS, (unsupervised, ofg, refine_only, forward))), repeats, warmup)
    if compile_model:
        # Compilation happens inside the first calls: their excess over the median.
        result["compile_s"] = sum(max(first_call[k] - result[k], 0.0) for k in TIMED_KEYS)
    else:
        result["compile_s"] = None
    result["times_s"] = times
    result["device"] = (torch.cuda.get_device_name() if device.type == "cuda"
                        else f"cpu: {torch.get_num_threads()} threads")
    result["peak_mb"] = (torch.cuda.max_memory_allocated() / 2 ** 20
                         if device.type == "cuda" else peak_rss_mb())
    return result


# ---------------------------------------------------------------------------
# Driver.


def run_worker(args) -> None:
    """Runs one framework in this process and writes its result to --worker-out."""
    shape = parse_shape(args.shape)
    if args.worker == "jax":
        result = run_jax(args.models, shape, args.batch, args.inner_steps, args.repeats,
                         args.warmup, args.breakdown)
    else:
        result = run_torch(args.models, shape, args.batch, args.inner_steps,
                           args.torch_repeats, args.torch_warmup,
                           args.worker == "torch_compile")
    with open(args.worker_out, "w") as f:
        json.dump(result, f)


def spawn_worker(framework: str, model_name: str, args) -> dict:
    """Runs one framework in a fresh subprocess; ``{"error": ...}`` if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        command = [sys.executable, "-m", "experiments.benchmark", "--worker", framework,
                   "--worker-out", out, "--models", model_name, "--shape", args.shape,
                   "--batch", str(args.batch), "--inner-steps", str(args.inner_steps),
                   "--repeats", str(args.repeats), "--warmup", str(args.warmup),
                   "--torch-repeats", str(args.torch_repeats),
                   "--torch-warmup", str(args.torch_warmup)]
        if args.breakdown:
            command.append("--breakdown")
        # The worker's log is passed through as it comes; its last line names the
        # exception if the worker fails.
        last_lines = collections.deque(maxlen=20)
        with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, cwd=REPO_ROOT) as proc:
            for line in proc.stderr:
                sys.stderr.write(line)
                if line.strip():
                    last_lines.append(line.strip())
        if proc.returncode != 0 or not os.path.exists(out):
            return {"error": last_lines[-1] if last_lines else
                    f"exit status {proc.returncode}", "returncode": proc.returncode}
        with open(out) as f:
            return json.load(f)


def benchmark(model_name: str, args) -> dict:
    """JAX and PyTorch (and optionally torch.compile) results for one model."""
    record = {"shape": list(parse_shape(args.shape)), "model": model_name,
              "batch": args.batch, "inner_steps": args.inner_steps,
              "repeats": args.repeats, "warmup": args.warmup,
              "torch_repeats": args.torch_repeats, "torch_warmup": args.torch_warmup,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "load_average_before": list(os.getloadavg())}
    frameworks = ["jax", "torch"] + (["torch_compile"] if args.torch_compile else [])
    for framework in frameworks:
        log(f"== {model_name} {args.shape}: {framework}")
        result = spawn_worker(framework, model_name, args)
        if framework == "jax" and "breakdown" in result:
            record["jax_breakdown"] = result.pop("breakdown")
        record[framework] = result
    devices = [record[f]["device"] for f in frameworks if "device" in record[f]]
    record["device"] = (devices[0] if devices and not devices[0].startswith("cpu")
                        else f"cpu: {cpu_description()}")
    record["load_average_after"] = list(os.getloadavg())
    return record


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def _torch_repeats(record: dict) -> str:
    repeats = record.get("torch_repeats", record["repeats"])
    warmup = record.get("torch_warmup", record["warmup"])
    if (repeats, warmup) == (record["repeats"], record["warmup"]):
        return ""
    return f" (PyTorch: {repeats} timed after {warmup} warm-up)"


def format_table(record: dict) -> str:
    """A readable table of one record, with torch/jax ratios."""
    others = [f for f in ("torch", "torch_compile") if f in record]
    header = ["", "jax"]
    for f in others:
        header += [f, f"{f}/jax"]
    rows = [header]
    jax_result = record["jax"]
    for key in RESULT_KEYS:
        row = [key, _fmt(jax_result.get(key))]
        for f in others:
            value = record[f].get(key)
            ref = jax_result.get(key)
            ratio = value / ref if value is not None and ref else None
            row += [_fmt(value), "-" if ratio is None else f"{ratio:.2f}x"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [f"{record['model']} {'x'.join(map(str, record['shape']))}, batch "
             f"{record['batch']}, {record['inner_steps']} inner steps, median of "
             f"{record['repeats']}{_torch_repeats(record)}; {record['device']}"]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    if "ofg_over_unsupervised" in jax_result:
        lines.append(f"jax OFG step / unsupervised step: "
                     f"{jax_result['ofg_over_unsupervised']:.2f}")
    for f in ("jax",) + tuple(others):
        if "error" in record[f]:
            lines.append(f"{f} failed: {record[f]['error']}")
    if "jax_breakdown" in record:
        parts = ", ".join(f"{k} {v:.3f} s" for k, v in record["jax_breakdown"].items())
        lines.append(f"jax OFG step parts: {parts}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="64,64,64", help="volume size D,H,W")
    parser.add_argument("--inner-steps", type=int, default=10,
                        help="OFG refinement steps per training step")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    parser.add_argument("--torch-repeats", type=int,
                        help="timed calls for PyTorch (default: --repeats); at full size "
                             "one eager OFG step takes many minutes on a CPU")
    parser.add_argument("--torch-warmup", type=int,
                        help="untimed PyTorch calls first (default: --warmup)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--models", default="voxelmorph",
                        help="comma-separated ofg_jax.models names")
    parser.add_argument("--torch-compile", action="store_true",
                        help="also time the baseline under torch.compile")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the parts of the JAX OFG step")
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    parse_shape(args.shape)
    args.torch_repeats = args.repeats if args.torch_repeats is None else args.torch_repeats
    args.torch_warmup = args.warmup if args.torch_warmup is None else args.torch_warmup
    for name, value, low in (("--inner-steps", args.inner_steps, 0),
                             ("--repeats", args.repeats, 1), ("--warmup", args.warmup, 1),
                             ("--torch-repeats", args.torch_repeats, 1),
                             ("--torch-warmup", args.torch_warmup, 0),
                             ("--batch", args.batch, 1)):
        if value < low:
            parser.error(f"{name} must be >= {low}, got {value}")
    if args.worker:
        run_worker(args)
        return

    records = [benchmark(name.strip(), args) for name in args.models.split(",")]
    for record in records:
        print(format_table(record))
        print()
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(records[0] if len(records) == 1 else records, f, indent=2)


if __name__ == "__main__":
    main()
