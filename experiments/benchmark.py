"""Training-step throughput and memory of ofg_jax (XLA) against PyTorch baselines.

For each network and framework, times on one synthetic batch: the unsupervised
training step, the OFG training step, ``refine`` alone and the network forward
pass. Every framework runs in its own subprocess (so that peak memories are
separate); with ``--isolate`` every (framework, function) does, so that each
function's peak is its own. Every timing is the median over ``--repeats`` calls
after ``--warmup`` untimed calls; the functions of one process are called in
turn (round-robin) so that a slow spell of a shared machine slows them alike;
JAX outputs are blocked on. JAX compile time is reported separately: the
ahead-of-time ``lower().compile()`` of the functions plus ``create_train_state``
(whose time is almost all the compilation of the initialiser).

    python -m experiments.benchmark --shape 64,64,64 --inner-steps 10 \\
        --repeats 3 --out bench_64.json [--models voxelmorph,vitvnet,transmorph] \\
        [--set transmorph:model.window_size=(2,2,2)] [--torch-compile] \\
        [--isolate] [--breakdown] [--torch-repeats 1 --torch-warmup 0] \\
        [--functions ofg_step,unsupervised_step --torch-functions ofg_step]

Networks: ``--models`` are ``ofg_jax.models`` names; the PyTorch baselines are
the networks of ``experiments.torch_networks`` (through
``experiments.torch_baseline.network``) with the same architecture options. ``--set KEY=VALUE``
overrides a config key for every network, ``--set NAME:KEY=VALUE`` for one
(keys and values as ``--config.KEY=VALUE`` of ``ofg_jax.main``; ``model.*``
options reach the PyTorch networks too). ``refine`` does not depend on the
network: with several networks it runs once per framework, for the first, and
the other records copy it (``refine_from``).

Memory: ``peak_mb`` is the process's peak resident set during the timed calls
on CPU (Linux's ``VmHWM``, reset after setup and warm-up; it includes the
parameters, the inputs and the runtime), peak device memory on GPU;
``process_peak_mb`` the whole process's, compilation included. With
``--isolate`` there is one per function (``<function>_peak_mb``) and ``peak_mb``
is their maximum.

JSON: ``{"shape", "device", "model", "options", "overrides", "batch",
"inner_steps", "repeats", "jax": {...}, "torch": {...}[, "torch_compile":
{...}][, "jax_breakdown": {...}]}`` where each framework entry holds
``unsupervised_step_s``, ``ofg_step_s``, ``refine_s``, ``forward_s``,
``compile_s`` and ``peak_mb``, or ``{"error": ...}`` when it could not run.
With several ``--models`` the file holds a list of such records.
"""

import argparse
import collections
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

from experiments.timing import (CompiledStep, cpu_description, interleaved_seconds,
                                parse_shape, peak_rss_mb, reset_peak_rss,
                                synthetic_batch)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "default.py")
FUNCTIONS = ("unsupervised_step", "ofg_step", "refine", "forward")
TIMED_KEYS = tuple(f"{f}_s" for f in FUNCTIONS)
PEAK_KEYS = tuple(f"{f}_peak_mb" for f in FUNCTIONS)
FRAMEWORKS = ("jax", "torch", "torch_compile")
# Functions that do not depend on the network: measured once per framework.
NETWORK_INDEPENDENT = ("refine",)
INNER_LR = 0.1


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# JAX.


def jax_config(model_name: str, mode: str, inner_steps: int, batch: int,
               overrides: Sequence[str] = ()):
    """The reference training config (``configs/default.py``) for ``mode``.

    ``overrides``: ``"KEY=VALUE"`` strings as ``--config.KEY=VALUE`` of
    ``ofg_jax.main`` (e.g. ``"model.window_size=(2,2,2)"``, ``"train.remat=True"``).
    """
    from ofg_jax.settings import config as config_lib
    config = config_lib.load(DEFAULT_CONFIG, [f"model.name={model_name}", *overrides])
    config = config_lib.with_overrides(config, {
        "train.mode": mode, "train.batch_size": batch,
        "ofg.steps": inner_steps, "ofg.learning_rate": INNER_LR})
    with config.unlocked():
        config.data.name = "synthetic"  # A valid config; the step reads no data.
    return config


def model_options(model_name: str, overrides: Sequence[str] = ()) -> dict:
    """The network options (``model.*`` but the name) that ``overrides`` give."""
    from ofg_jax.settings import config as config_lib
    return config_lib.model_options(jax_config(model_name, "ofg", 1, 1, overrides))


def run_jax(model_name: str, overrides: Sequence[str], shape, batch: int,
            inner_steps: int, functions: Sequence[str], repeats: int, warmup: int,
            breakdown: bool) -> dict:
    """Times the jitted ``ofg_jax`` train steps, ``refine`` and the forward pass."""
    import jax
    import jax.numpy as jnp
    from ofg_jax.settings import config as config_lib
    from ofg_jax import refine
    from ofg_jax.training.step import create_train_state

    device = jax.devices()[0]
    moving, fixed = (jax.device_put(x) for x in synthetic_batch(shape, batch))
    data = {"moving": moving, "fixed": fixed}
    calls, compile_times, steps = {}, {}, {}
    for mode in ("unsupervised", "ofg"):
        key = f"{mode}_step"
        if key in functions:
            steps[key] = CompiledStep(
                jax_config(model_name, mode, inner_steps, batch, overrides), shape, data)
            calls[key] = steps[key]
            compile_times[key] = steps[key].compile_seconds
    model = variables = None
    if "forward" in functions or breakdown:
        if "ofg_step" in steps:
            model = steps["ofg_step"].model
            state = steps["ofg_step"].state
        else:
            start = time.perf_counter()
            config = jax_config(model_name, "ofg", inner_steps, batch, overrides)
            model = config_lib.build_model(config, shape)
            state = create_train_state(config, model, shape, 10 ** 6)
            compile_times["init"] = time.perf_counter() - start
        # A copy: the steps donate (and so delete) their state.
        variables = jax.tree.map(jnp.copy, state.variables)
        params = variables["params"]

    jitted = {}
    if "refine" in functions:
        disp = jnp.zeros((batch, *shape, len(shape)), jnp.float32)
        jitted["refine"] = (jax.jit(jax.vmap(functools.partial(
            refine, steps=inner_steps, learning_rate=INNER_LR))), (moving, fixed, disp))
    if "forward" in functions:
        pair = jnp.stack([moving, fixed], axis=-1)
        jitted["forward"] = (jax.jit(lambda v, x: model.apply(v, x, train=False)),
                             (variables, pair))
    for key, (fn, args) in jitted.items():
        start = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_times[key] = time.perf_counter() - start
        calls[key] = lambda c=compiled, a=args: jax.block_until_ready(c(*a))
    calls = {f: calls[f] for f in FUNCTIONS if f in calls}

    log(f"jax: timing {', '.join(calls)}, interleaved")
    result = _timed(calls, repeats, warmup)
    result["compile_s"] = sum(compile_times.values())
    result["compile_breakdown_s"] = compile_times
    if "ofg_step_s" in result and "unsupervised_step_s" in result:
        result["ofg_over_unsupervised"] = (result["ofg_step_s"]
                                           / result["unsupervised_step_s"])
    result["device"] = f"{device.platform}: {device.device_kind}"
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:  # not resettable: the whole process
        result["peak_mb"] = result["process_peak_mb"] = stats["peak_bytes_in_use"] / 2 ** 20
    if breakdown:
        result["breakdown"] = jax_step_breakdown(model, params, moving, fixed,
                                                 inner_steps, repeats, warmup)
    return result


def counting_compile_time(calls: dict, compile_seconds: Callable[[], float]
                          ) -> tuple[dict, dict]:
    """Wraps ``calls`` to record the compile time spent inside each call.

    ``compile_seconds()`` is a cumulative compile-time counter (seconds). Returns
    the wrapped calls and, per call name, the list that receives one entry per
    call.
    """
    spent = {key: [] for key in calls}

    def counted(key, fn):
        def call():
            before = compile_seconds()
            fn()
            spent[key].append(compile_seconds() - before)
        return call

    return {key: counted(key, fn) for key, fn in calls.items()}, spent


def without_compile_time(times: dict, spent: dict, warmup: int) -> dict:
    """Medians of the timed calls less the compile time inside each; the total.

    ``times``: per call name, the timed calls' seconds; ``spent``: per call name,
    the compile seconds of every call, the ``warmup`` untimed ones first.
    """
    result = {"compile_s": sum(sum(s) for s in spent.values()),
              "compile_in_timed_calls_s": {k: s[warmup:] for k, s in spent.items()}}
    for key, seconds in times.items():
        result[f"{key}_s"] = statistics.median(
            t - c for t, c in zip(seconds, spent[key][warmup:]))
    return result


def _timed(calls: dict, repeats: int, warmup: int,
           on_timed_start: Callable[[], object] = reset_peak_rss) -> dict:
    """Interleaved medians of ``calls`` (keys ``<function>_s``), all timings and
    the peak RSS of the timed calls (``peak_mb``) and of the process.

    ``on_timed_start`` runs between the warm-up and the timed rounds; it must
    reset the peak RSS (:func:`reset_peak_rss`).
    """
    setup_peak = peak_rss_mb()
    medians, times, _ = interleaved_seconds(calls, repeats, warmup,
                                            on_timed_start=on_timed_start)
    result = {f"{key}_s": value for key, value in medians.items()}
    result["times_s"] = times
    result["peak_mb"] = peak_rss_mb()
    result["process_peak_mb"] = max(setup_peak, result["peak_mb"])
    return result


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


def run_torch(model_name: str, options: dict, shape, batch: int, inner_steps: int,
              functions: Sequence[str], repeats: int, warmup: int,
              compile_model: bool) -> dict:
    """Times the eager PyTorch baseline.

    With ``compile_model`` the network and the inner energy (warp, NCC, Grad) are
    ``torch.compile``-d; the optimisers and the inner loop stay eager. Its
    ``compile_s`` is the compile time that torch._dynamo's own timer counts inside
    the calls, and that time is taken out of each timed call: without a warm-up
    call (``warmup=0``) the one timed call also compiles.
    """
    import torch
    from experiments import torch_baseline as tb

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = tb.network(model_name, shape, **options).to(device)
    optimizer = tb.make_optimizer(model)
    moving, fixed = (torch.from_numpy(x)[:, None].to(device)
                     for x in synthetic_batch(shape, batch))
    disp = torch.zeros((batch, len(shape), *shape), device=device)
    pair = torch.cat([moving, fixed], dim=1)
    net, energy = model, tb.registration_energy
    if compile_model:
        net, energy = torch.compile(model), torch.compile(tb.registration_energy)
    refine_kwargs = dict(steps=inner_steps, lr=INNER_LR, energy=energy)

    def unsupervised_step():
        tb.train_step(net, optimizer, moving, fixed, mode="unsupervised")
        sync()

    def ofg_step():
        tb.train_step(net, optimizer, moving, fixed, mode="ofg", **refine_kwargs)
        sync()

    def refine():
        tb.refine(moving, fixed, disp, **refine_kwargs)
        sync()

    def forward():
        net.eval()
        with torch.no_grad():
            net.predict(pair)
        sync()

    every = {"unsupervised_step": unsupervised_step, "ofg_step": ofg_step,
             "refine": refine, "forward": forward}
    calls = {f: every[f] for f in FUNCTIONS if f in functions}
    name = "torch_compile" if compile_model else "torch"
    log(f"{name}: timing {', '.join(calls)}, interleaved")

    def timed_start():
        reset_peak_rss()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    if compile_model:
        from torch._dynamo.utils import calculate_time_spent
        calls, compiling = counting_compile_time(
            calls, lambda: calculate_time_spent().get("total_wall_time", 0.0))
    result = _timed(calls, repeats, warmup, on_timed_start=timed_start)
    if compile_model:
        result.update(without_compile_time(result["times_s"], compiling, warmup))
    else:
        result["compile_s"] = None
    result["device"] = (torch.cuda.get_device_name() if device.type == "cuda"
                        else f"cpu: {torch.get_num_threads()} threads")
    if device.type == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        result["process_peak_mb"] = None
    result["parameters"] = sum(p.numel() for p in model.parameters())
    return result


# ---------------------------------------------------------------------------
# Driver.


def run_worker(args) -> None:
    """Runs one framework in this process and writes its result to --worker-out."""
    shape = parse_shape(args.shape)
    functions = args.functions.split(",")
    if args.worker == "jax":
        result = run_jax(args.models, args.set, shape, args.batch, args.inner_steps,
                         functions, args.repeats, args.warmup, args.breakdown)
    else:
        options = {k: tuple(v) if isinstance(v, list) else v
                   for k, v in json.loads(args.options or "{}").items()}
        result = run_torch(args.models, options, shape, args.batch, args.inner_steps,
                           functions, args.torch_repeats, args.torch_warmup,
                           args.worker == "torch_compile")
    with open(args.worker_out, "w") as f:
        json.dump(result, f)


def spawn_worker(framework: str, model_name: str, functions: Sequence[str],
                 overrides: Sequence[str], options: Optional[dict], args,
                 breakdown: bool) -> dict:
    """Runs one framework in a fresh subprocess; ``{"error": ...}`` if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        command = [sys.executable, "-m", "experiments.benchmark", "--worker", framework,
                   "--worker-out", out, "--models", model_name,
                   "--functions", ",".join(functions), "--shape", args.shape,
                   "--batch", str(args.batch), "--inner-steps", str(args.inner_steps),
                   "--repeats", str(args.repeats), "--warmup", str(args.warmup),
                   "--torch-repeats", str(args.torch_repeats),
                   "--torch-warmup", str(args.torch_warmup),
                   "--options", json.dumps(options or {})]
        for override in overrides:
            command += ["--set", override]
        if breakdown:
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


def _merge_isolated(parts: dict) -> dict:
    """One framework's result from one worker per function."""
    merged = {"times_s": {}, "compile_s": None, "compile_breakdown_s": {}}
    errors = []
    for function, part in parts.items():
        if "error" in part:
            errors.append(f"{function}: {part['error']}")
            continue
        merged[f"{function}_s"] = part[f"{function}_s"]
        merged[f"{function}_peak_mb"] = part["peak_mb"]
        merged[f"{function}_process_peak_mb"] = part.get("process_peak_mb")
        merged["times_s"].update(part["times_s"])
        if part.get("compile_s") is not None:
            merged["compile_s"] = (merged["compile_s"] or 0.0) + part["compile_s"]
        merged["compile_breakdown_s"].update(part.get("compile_breakdown_s", {}))
        for key in ("device", "parameters", "breakdown"):
            if key in part:
                merged[key] = part[key]
    peaks = [merged[f"{f}_peak_mb"] for f in parts if f"{f}_peak_mb" in merged]
    if peaks:
        merged["peak_mb"] = max(peaks)
    if "ofg_step_s" in merged and "unsupervised_step_s" in merged:
        merged["ofg_over_unsupervised"] = merged["ofg_step_s"] / merged["unsupervised_step_s"]
    if errors:
        merged["error"] = "; ".join(errors)
    return merged


def parse_sets(sets: Sequence[str], models: Sequence[str]) -> dict[str, list[str]]:
    """``--set`` values -> the overrides of each model (``NAME:KEY=VALUE`` for one)."""
    per_model = {name: [] for name in models}
    for item in sets:
        head = item.split("=", 1)[0]
        if ":" in head:
            name, override = item.split(":", 1)
            if name not in per_model:
                raise ValueError(f"--set {item!r} names {name!r}, which is not in --models")
            per_model[name].append(override)
        else:
            for overrides in per_model.values():
                overrides.append(item)
    return per_model


def benchmark(model_name: str, overrides: Sequence[str], args,
              shared: Optional[dict] = None,
              on_framework: Callable[[dict], object] = lambda record: None) -> dict:
    """The record of one network: every framework, every function.

    ``shared``: per framework, the result of an earlier network whose
    network-independent functions (``refine``) this record copies instead of
    measuring them again; filled by this call when empty. ``on_framework(record)``
    is called with the record so far after each framework.
    """
    shared = {} if shared is None else shared
    record = {"shape": list(parse_shape(args.shape)), "model": model_name,
              "overrides": list(overrides), "batch": args.batch,
              "inner_steps": args.inner_steps, "isolate": args.isolate,
              "repeats": args.repeats, "warmup": args.warmup,
              "torch_repeats": args.torch_repeats, "torch_warmup": args.torch_warmup,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "load_average_before": list(os.getloadavg())}
    try:
        options = model_options(model_name, overrides)
        record["options"] = options
    except Exception as e:  # reported in the record, as a failing worker is
        options = None
        log(f"{model_name}: no options: {e}")
    for framework in args.frameworks:
        log(f"== {model_name} {args.shape}: {framework}")
        reuse = shared.get(framework)
        timed = args.functions if framework == "jax" else args.torch_functions
        functions = [f for f in timed
                     if not (reuse and f in NETWORK_INDEPENDENT and f"{f}_s" in reuse)]
        breakdown = args.breakdown and framework == "jax"
        if args.isolate:
            parts = {f: spawn_worker(framework, model_name, [f], overrides, options, args,
                                     breakdown and f == "ofg_step") for f in functions}
            result = _merge_isolated(parts)
        else:
            result = spawn_worker(framework, model_name, functions, overrides, options,
                                  args, breakdown)
        if reuse:
            for f in NETWORK_INDEPENDENT:
                if f"{f}_s" not in reuse:
                    continue
                for key in (f"{f}_s", f"{f}_peak_mb"):
                    if key in reuse and key not in result:
                        result[key] = reuse[key]
                result[f"{f}_from"] = reuse["model"]
        elif "error" not in result:
            shared[framework] = dict(result, model=model_name)
        if "breakdown" in result:
            record["jax_breakdown"] = result.pop("breakdown")
        record[framework] = result
        on_framework(record)
    devices = [record[f]["device"] for f in args.frameworks if "device" in record[f]]
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
    frameworks = [f for f in FRAMEWORKS if f in record]
    base = "jax" if "jax" in record else frameworks[0]
    others = [f for f in frameworks if f != base]
    header = ["", base]
    for f in others:
        header += [f, f"{f}/{base}"]
    rows = [header]
    ref_result = record[base]
    keys = list(TIMED_KEYS) + ["compile_s"]
    if any(k in record[f] for f in frameworks for k in PEAK_KEYS):
        keys += [k for k in PEAK_KEYS if any(k in record[f] for f in frameworks)]
    else:
        keys.append("peak_mb")
    keys = [k for k in keys if any(record[f].get(k) is not None for f in frameworks)
            or k in ("compile_s",)]
    for key in keys:
        row = [key, _fmt(ref_result.get(key))]
        for f in others:
            value = record[f].get(key)
            ref = ref_result.get(key)
            ratio = value / ref if value is not None and ref else None
            row += [_fmt(value), "-" if ratio is None else f"{ratio:.2f}x"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    options = "".join(f", {o}" for o in record.get("overrides", []))
    lines = [f"{record['model']}{options} {'x'.join(map(str, record['shape']))}, batch "
             f"{record['batch']}, {record['inner_steps']} inner steps, median of "
             f"{record['repeats']}{_torch_repeats(record)}"
             f"{', one process per function' if record.get('isolate') else ''}; "
             f"{record['device']}"]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    if "ofg_over_unsupervised" in ref_result:
        lines.append(f"{base} OFG step / unsupervised step: "
                     f"{ref_result['ofg_over_unsupervised']:.2f}")
    shared_from = {ref_result.get(f"{f}_from") for f in NETWORK_INDEPENDENT} - {None}
    if shared_from:
        lines.append(f"refine (network-independent) measured with {', '.join(shared_from)}")
    if "torch_compile" in record:
        lines.append("torch_compile: the compile time inside the calls (torch._dynamo's "
                     "timer) is taken out of their times and shown as compile_s")
    for f in frameworks:
        if "error" in record[f]:
            lines.append(f"{f} failed: {record[f]['error']}")
    if "jax_breakdown" in record:
        parts = ", ".join(f"{k} {v:.3f} s" for k, v in record["jax_breakdown"].items())
        lines.append(f"jax OFG step parts: {parts}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> list:
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
    parser.add_argument("--set", action="append", default=[], metavar="[NAME:]KEY=VALUE",
                        help="config override for every network, or for network NAME; "
                             "repeatable")
    parser.add_argument("--frameworks", default="jax,torch",
                        help=f"comma-separated, from {', '.join(FRAMEWORKS)}")
    parser.add_argument("--torch-compile", action="store_true",
                        help="also time the baseline under torch.compile")
    parser.add_argument("--isolate", action="store_true",
                        help="one process per function: a peak memory for each")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the parts of the JAX OFG step")
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--functions", default=",".join(FUNCTIONS),
                        help=f"comma-separated, from {', '.join(FUNCTIONS)} (default: all)")
    parser.add_argument("--torch-functions",
                        help="the functions timed for PyTorch (default: --functions); at "
                             "full size PyTorch's calls take many minutes")
    parser.add_argument("--options", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        parse_shape(args.shape)
    except ValueError as e:
        parser.error(str(e))
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
        return []

    args.torch_functions = args.torch_functions or args.functions
    for flag in ("functions", "torch_functions"):
        value = getattr(args, flag)
        functions = [f.strip() for f in value.split(",") if f.strip()]
        unknown = [f for f in functions if f not in FUNCTIONS]
        if unknown or not functions:
            parser.error(f"--{flag.replace('_', '-')}: unknown {unknown}; "
                         f"valid: {', '.join(FUNCTIONS)}")
        setattr(args, flag, [f for f in FUNCTIONS if f in functions])
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    if args.torch_compile and "torch_compile" not in frameworks:
        frameworks.append("torch_compile")
    unknown = [f for f in frameworks if f not in FRAMEWORKS]
    if unknown or not frameworks:
        parser.error(f"--frameworks: unknown {unknown}; valid: {', '.join(FRAMEWORKS)}")
    args.frameworks = frameworks
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    try:
        per_model = parse_sets(args.set, models)
    except ValueError as e:
        parser.error(str(e))
    shared: dict = {}
    records = []

    def save(done: list) -> None:
        """Writes the records so far: a long run keeps what it has."""
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(done[0] if len(done) == 1 else done, f, indent=2)

    for name in models:
        records.append(benchmark(name, per_model[name], args, shared,
                                 on_framework=lambda record: save(records + [record])))
        save(records)
        print(format_table(records[-1]), flush=True)
        print(flush=True)
    return records


if __name__ == "__main__":
    main()
