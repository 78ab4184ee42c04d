"""Where the memory of the jitted JAX functions goes: XLA's buffer assignment.

For each network and function (the OFG and the unsupervised training step,
``refine`` alone, the forward pass) this compiles the function ahead of time on
abstract inputs (nothing of full size is allocated) and prints XLA's
``memory_analysis()``: the bytes of the arguments, the outputs, the outputs that
alias donated arguments, and the temporary buffers (on CPU one allocation per
call, the live set at the peak after XLA's heap simulation). With ``--dump DIR``
it also dumps XLA's buffer assignment and prints the largest buffers live at
the peak, grouped by the JAX operation that made them (from XLA's
``*-live-range.txt``: "Stack trace breakdown for peak usage").

    python -m experiments.memory_report --shape 160,192,224 \\
        --models voxelmorph,vitvnet,transmorph --functions ofg_step [--dump /tmp/xla] \\
        [--set train.remat=True]

The process peak of a run is about ``arguments + outputs - aliased + temp`` plus
the runtime's own few hundred MB (``experiments/benchmark.py`` measures it).
"""

import argparse
import glob
import os
import re
import shutil
import sys
from typing import Optional, Sequence

FUNCTIONS = ("ofg_step", "unsupervised_step", "refine", "forward")
MB = 2 ** 20


def _abstract_inputs(model_name, shape, function, inner_steps, overrides):
    """``(jitted function, abstract args)`` of one benchmark function."""
    import functools
    import jax
    import jax.numpy as jnp
    from experiments import benchmark
    from ofg_jax.settings import config as config_lib
    from ofg_jax import refine
    from ofg_jax.training.step import create_train_state, make_train_step

    batch = {k: jax.ShapeDtypeStruct((1, *shape), jnp.float32) for k in ("moving", "fixed")}
    if function == "refine":
        fn = jax.jit(jax.vmap(functools.partial(refine, steps=inner_steps,
                                                learning_rate=benchmark.INNER_LR)))
        disp = jax.ShapeDtypeStruct((1, *shape, 3), jnp.float32)
        return fn, (batch["moving"], batch["fixed"], disp)
    mode = "unsupervised" if function == "unsupervised_step" else "ofg"
    config = benchmark.jax_config(model_name, mode, inner_steps, 1, overrides)
    model = config_lib.build_model(config, shape)
    steps_per_epoch = 10 ** 6
    state = jax.eval_shape(lambda: create_train_state(config, model, shape, steps_per_epoch))
    if function == "forward":
        x = jax.ShapeDtypeStruct((1, *shape, 2), jnp.float32)
        fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
        return fn, (state.variables, x)
    return make_train_step(config_lib.resolve(config), steps_per_epoch, shape), (state, batch)


def _peak_breakdown(dump_dir: str, top: int) -> list[str]:
    """The top entries of XLA's "Stack trace breakdown for peak usage"."""
    files = sorted(glob.glob(os.path.join(dump_dir, "*-live-range.txt")),
                   key=os.path.getmtime)
    if not files:
        return ["(no live-range dump found)"]
    with open(files[-1]) as f:
        text = f.read()
    start = text.find("Stack trace breakdown for peak usage")
    if start < 0:
        return ["(no peak breakdown in the dump)"]
    lines = text[start:].splitlines()
    out = [lines[0].strip()]
    pattern = re.compile(r"^ {6}[├└]── (.*) \(([\d.]+)%, total: ([\d ]+) bytes")
    entries = []
    for line in lines[1:]:
        m = pattern.match(line)
        if m:
            entries.append((int(m.group(3).replace(" ", "")), m.group(1)))
    for size, name in sorted(entries, reverse=True)[:top]:
        out.append(f"  {size / MB:9.1f} MB  {name}")
    return out


def report(model_name: str, shape, function: str, inner_steps: int, overrides: Sequence[str],
           dump_dir: Optional[str], top: int) -> dict:
    """Compiles one function; returns its memory analysis in MB (and prints it)."""
    fn, args = _abstract_inputs(model_name, shape, function, inner_steps, overrides)
    if dump_dir:
        shutil.rmtree(dump_dir, ignore_errors=True)
        os.makedirs(dump_dir)
    stats = fn.lower(*args).compile().memory_analysis()
    result = {"argument_mb": stats.argument_size_in_bytes / MB,
              "output_mb": stats.output_size_in_bytes / MB,
              "alias_mb": stats.alias_size_in_bytes / MB,
              "temp_mb": stats.temp_size_in_bytes / MB}
    result["total_mb"] = (result["argument_mb"] + result["output_mb"]
                          - result["alias_mb"] + result["temp_mb"])
    print(f"{model_name} {function} {'x'.join(map(str, shape))}: " + ", ".join(
        f"{k[:-3]} {v:.0f} MB" for k, v in result.items()), flush=True)
    if dump_dir:
        for line in _peak_breakdown(dump_dir, top):
            print("   " + line, flush=True)
    return result


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="64,64,64")
    parser.add_argument("--models", default="voxelmorph")
    parser.add_argument("--functions", default="ofg_step",
                        help=f"comma-separated, from {', '.join(FUNCTIONS)}")
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (as --config.KEY=VALUE), repeatable")
    parser.add_argument("--dump", help="dump XLA's buffer assignment here and print "
                        "the largest buffers live at the peak")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    functions = [f.strip() for f in args.functions.split(",")]
    bad = [f for f in functions if f not in FUNCTIONS]
    if bad:
        parser.error(f"unknown functions {bad}; valid: {', '.join(FUNCTIONS)}")
    if args.dump:
        if "jax" in sys.modules:
            parser.error("--dump must be set before jax is imported")
        os.makedirs(args.dump, exist_ok=True)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_dump_to={args.dump} --xla_dump_hlo_as_text"
                                   " --xla_dump_hlo_module_re=.*(train_step|refine|"
                                   "lambda).*")
    from experiments.timing import parse_shape
    shape = parse_shape(args.shape)
    overrides = tuple(args.set)
    results = {}
    for name in args.models.split(","):
        for function in functions:
            results[(name, function)] = report(name.strip(), shape, function,
                                               args.inner_steps, overrides, args.dump,
                                               args.top)
    return results


if __name__ == "__main__":
    main()
