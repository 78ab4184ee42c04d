"""VoxelMorph's jitted forward and ``refine`` timed in checkouts of two or more commits.

Each (checkout, function) runs in its own process, the checkouts alternated
(``A B A B ...``, for each function in turn), so that a slow spell of a shared
machine falls on all of them alike. A process imports ``ofg_jax`` from its
checkout (``PYTHONPATH``), compiles the function, calls it ``--warmup`` times
and then ``--calls`` times, timing each call in wall seconds and in the
process's CPU seconds (all its threads; less sensitive than wall seconds to
other jobs that share the cores). The parent also records every child's
whole-process user and system seconds and peak resident set (``wait4``).

    git worktree add --detach /tmp/old cce4400
    nice -n -10 python -m experiments.commit_ab --trees /tmp/old,. --rounds 4 \\
        --functions forward,refine --shape 160,192,224 --out ab.json

The functions use only what every version of the package since cce4400 has:
``ofg_jax.models.create("voxelmorph", shape)`` applied with ``train=False`` to
a uniform random ``(1, *shape, 2)`` pair, and ``jax.jit(jax.vmap(refine))``
with ``steps=10, learning_rate=0.1`` on uniform random ``(1, *shape)`` images
and a zero ``(1, *shape, 3)`` field. The same seeds in every checkout.

Output: one line per process, then a table of the median over rounds of each
checkout's median call, and the ratio of each checkout to the first, round by
round (median and range); ``--out`` writes every number as JSON.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Optional, Sequence

FUNCTIONS = ("forward", "refine")


def _child(function: str, shape: Sequence[int], warmup: int, calls: int) -> dict:
    """Compiles and times ``function`` in this process; returns the timings."""
    import jax
    import jax.numpy as jnp

    import ofg_jax
    from ofg_jax import models

    key = jax.random.PRNGKey(0)
    if function == "forward":
        model = models.create("voxelmorph", shape)
        x = jax.random.uniform(jax.random.fold_in(key, 1), (1, *shape, 2), jnp.float32)
        params = jax.jit(model.init)(key, x)["params"]
        fn = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
        args = (params, x)
    else:
        moving = jax.random.uniform(jax.random.fold_in(key, 1), (1, *shape), jnp.float32)
        fixed = jax.random.uniform(jax.random.fold_in(key, 2), (1, *shape), jnp.float32)
        disp = jnp.zeros((1, *shape, 3), jnp.float32)
        fn = jax.jit(jax.vmap(lambda m, f, d: ofg_jax.refine(
            m, f, d, steps=10, learning_rate=0.1)))
        args = (moving, fixed, disp)
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    wall, cpu = [], []
    for i in range(warmup + calls):
        w, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(compiled(*args))
        if i >= warmup:
            wall.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
    return {"package": os.path.dirname(ofg_jax.__file__), "compile_s": compile_s,
            "wall_s": wall, "cpu_s": cpu}


def _run_child(tree: str, function: str, shape, warmup: int, calls: int) -> dict:
    """Runs :func:`_child` in a new process on ``tree``'s package."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", function,
           "--shape", ",".join(map(str, shape)), "--warmup", str(warmup),
           "--calls", str(calls)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=os.path.abspath(tree),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.stdout.read(), proc.stderr.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{tree} {function} failed ({proc.returncode}):\n{err[-3000:]}")
    record = json.loads(out.strip().splitlines()[-1])
    record.update(process_wall_s=time.perf_counter() - start,
                  process_user_s=usage.ru_utime, process_sys_s=usage.ru_stime,
                  process_peak_mb=usage.ru_maxrss / 1024)
    return record


def _summary(records: list, trees: Sequence[str], function: str, key: str) -> str:
    """Median over rounds per tree, and ratios to the first tree, round by round."""
    per_tree = {t: [statistics.median(r[key]) if isinstance(r[key], list) else r[key]
                    for r in records if r["tree"] == t and r["function"] == function]
                for t in trees}
    base = per_tree[trees[0]]
    cells = []
    for t in trees:
        vals = per_tree[t]
        ratios = [v / b for v, b in zip(vals, base)]
        cells.append(f"{statistics.median(vals):.2f} (x{statistics.median(ratios):.3f}, "
                     f"{min(ratios):.3f}-{max(ratios):.3f})")
    return f"| {function} | {key} | " + " | ".join(cells) + " |"


def main(argv: Optional[Sequence[str]] = None) -> list:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", help="comma-separated checkouts; the first is the base")
    parser.add_argument("--functions", default="forward,refine",
                        help=f"comma-separated, of {', '.join(FUNCTIONS)}")
    parser.add_argument("--shape", default="160,192,224", help="volume size D,H,W")
    parser.add_argument("--rounds", type=int, default=4, help="alternations")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per process")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per process")
    parser.add_argument("--out", help="write every record here (JSON)")
    parser.add_argument("--child", choices=FUNCTIONS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(int(n) for n in args.shape.split(","))
    if args.child:
        print(json.dumps(_child(args.child, shape, args.warmup, args.calls)))
        return []
    functions = args.functions.split(",")
    if not args.trees or any(f not in FUNCTIONS for f in functions):
        parser.error(f"--trees is required and --functions must be of {FUNCTIONS}")
    if args.rounds < 1 or args.calls < 1 or args.warmup < 0 or len(shape) != 3:
        parser.error("--rounds and --calls must be >= 1, --warmup >= 0, --shape D,H,W")
    trees = args.trees.split(",")
    for tree in trees:
        if not os.path.isdir(os.path.join(tree, "ofg_jax")):
            parser.error(f"{tree} is not a checkout of the package (no ofg_jax/)")
    records = []
    for round_ in range(args.rounds):
        for function in functions:
            for tree in trees:
                record = dict(_run_child(tree, function, shape, args.warmup, args.calls),
                              tree=tree, function=function, round=round_,
                              loadavg=os.getloadavg())
                records.append(record)
                print(f"{time.strftime('%H:%M:%S')} round {round_} {function} {tree}: "
                      f"wall {statistics.median(record['wall_s']):.2f} s "
                      f"cpu {statistics.median(record['cpu_s']):.2f} s per call, process "
                      f"user {record['process_user_s']:.1f} s, peak "
                      f"{record['process_peak_mb']:.0f} MB, load "
                      f"{record['loadavg'][0]:.2f}", flush=True)
                if args.out:
                    with open(args.out, "w") as f:
                        json.dump({"shape": shape, "trees": trees, "records": records}, f,
                                  indent=1)
    print(f"\n{'x'.join(map(str, shape))}, median over {args.rounds} rounds of each "
          f"process's median of {args.calls} calls (x ratio to {trees[0]}: median, range "
          "over rounds)")
    print("| function | figure | " + " | ".join(trees) + " |")
    print("|---|---|" + "---:|" * len(trees))
    for function in functions:
        for key in ("wall_s", "cpu_s", "process_user_s"):
            print(_summary(records, trees, function, key))
    return records


if __name__ == "__main__":
    main()
