"""Registration with no network against its best peers, on real inter-subject brain pairs.

    python -m experiments.registration_peers --pairs-dir /tmp/brain_pairs \\
        --data ../shared/data/oasis_subject_160x192x224.npz \\
        --venvs /tmp/peer-venvs --out workdir/registration_peers --threads 2
    # a quick run: one pair, two tools, one run each
    python -m experiments.registration_peers --pairs-dir /tmp/brain_pairs \\
        --pairs subject_to_mni_2mm --tools ofg_jax,fireants --runs 1 --out /tmp/peers

The peers, each run in its own process and virtualenv (``--venvs``), one process
at a time, by an adapter of ``experiments/peers/`` that follows the tool's
documented recipe (its docstring gives every parameter and where it comes from):

- ``ofg_jax``, ``ofg_jax_displacement``, ``ofg_jax_2mm``: ``python -m
  ofg_jax.register --affine --moving=... --fixed=... --out=...`` as it is (its
  defaults at the time of the run: the log's ``path:`` line is recorded), with
  ``--nodiffeomorphic`` (the displacement mode, which folds), and with
  ``--voxel-size=2`` (a 2 mm working grid, for the 1 mm pairs); this
  interpreter.
- ``ants_syn_cc``: antspyx ``antsRegistrationSyN[s]`` (rigid + affine with MI,
  then SyN with CC; ANTs' recommended ``antsRegistrationSyN.sh``), and
  ``ants_syn``: antspyx's default ``SyN`` (affine + SyN, Mattes MI);
  ``experiments/peers/run_ants.py``.
- ``fireants``: FireANTs on the CPU (non-fused PyTorch ops, ``cc`` loss):
  moments, affine, greedy deformable (``experiments/peers/run_fireants.py``).
- ``syntx``: syntx's JAX backend, affine + SyN with LNCC
  (``experiments/peers/run_syntx.py``).

The virtualenvs (once; the commands that were used, versions pinned; on this
project's machines ``torch==2.13.0`` is a local CPU build: install it first,
alone, where torch is needed, or pip pulls GBs of CUDA packages):

    VENVS=/tmp/peer-venvs
    python3 -m venv $VENVS/ants && $VENVS/ants/bin/pip install antspyx==0.6.3
    python3 -m venv $VENVS/fireants && $VENVS/fireants/bin/pip install torch==2.13.0 \\
        && $VENVS/fireants/bin/pip install fireants==1.5.0
    python3 -m venv $VENVS/syntx && $VENVS/syntx/bin/pip install torch==2.13.0 \\
        && $VENVS/syntx/bin/pip install syntx==5.4.15 "torchvision==0.28.*"

(antspyx pins numpy<2.4 and scipy<1.16, hence its own virtualenv; fireants
pins SimpleITK==2.2.1, which has a wheel for this Python; syntx needs
torchvision, whose 0.28 series is the one built for torch 2.13, and imports
``antstorch``, which is on no package index: its adapter registers a stand-in
that fails on any use, and its recipe uses none of it.) ofg_jax runs in this
interpreter (the repository's virtualenv).

The pairs (``experiments/brain_pairs.py``; ``--pairs``, default all of
:data:`brain_pairs.PAIRS`) are read from ``--pairs-dir``; the missing ones are
built there from ``--data`` (the subject's ``.npz``) and nilearn's MNI152.

Every tool gets the same ``--threads`` (default: the CPUs this process may run
on): its process and all it starts are pinned to that many CPUs
(``os.sched_setaffinity``; XLA's CPU thread pool, ofg_jax's and syntx's, is
sized by it), with ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``,
``OPENBLAS_NUM_THREADS`` and ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` (ANTs'
ITK threads) set to it, and ``XLA_FLAGS`` extended by
``--xla_cpu_multi_thread_eigen=true`` (``false`` for one thread) and
``intra_op_parallelism_threads=N`` (not an XLA flag, XLA ignores it; set so that
syntx's own default, 8, which it puts in ``XLA_FLAGS`` unless the variable is
set, does not apply); the torch adapters (FireANTs, syntx) also call
``torch.set_num_threads``. Each (tool, pair) runs ``--runs`` times (default 2)
with a fresh cache folder as ``XDG_CACHE_HOME`` (and ``TORCHINDUCTOR_CACHE_DIR``
under it): the first run cold (ofg_jax compiles and fills its persistent
compilation cache), the next ones warm (the peers keep no compiled programs
across processes: their runs differ by the machine's noise alone).

Every method is scored by the same code (:func:`brain_pairs.score`) from its
transform, from the last run: ofg_jax's ``transform.nii.gz`` and ``affine.mat``,
each peer's whole transform composed into one ITK displacement field on the
fixed grid (checked to be on that grid). Columns: Dice (mean, GM, WM), HD95 (mm),
% of the brain's voxels with det <= 0, SDlogJ, the error against a known answer
(mm), the registration's seconds as the tool measures them in its process
(ofg_jax: its log's affine and optimisation seconds, without compilation;
the peers: their registration calls timed by the adapter, any JIT compilation
included) in the last run, the whole process's wall seconds from launch to exit
of the first (cold) and of the last (warm) run, and the peak memory (the
largest max RSS of any process of the tool's process tree, ``wait4``, over the
runs). References: no registration, ofg_jax's affine alone, the known answer.
The conversion of each transform is checked on every run: ``warped_agreement``
(in the JSON) is the correlation over the brain between the moving image as the
tool resampled it (its ``warped.nii.gz``) and as the scoring resamples it
through the converted transform (1 when they agree). ``--tools=identity``
(not in the default list) runs ``experiments/peers/run_identity.py``, a zero
field written by a tool's process, which must score as no registration.

Outputs in ``--out``: ``runs/<pair>/<tool>/run<i>/`` (the tool's files and
``log.txt``), ``json/<pair>__<tool>.json`` (one per run of a tool on a pair;
an existing one is reused unless ``--force``, a failed one is run again;
``--tables-only`` runs nothing and tabulates the records there, each with the
date of its own run),
``registration_peers.json`` (everything, with the date, the machine and the
load averages) and ``registration_peers.md`` (the tables).
"""

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "registration_peers"
FIELD_FILE = "field.nii.gz"  # experiments.peers.protocol.FIELD_FILE
RESULT_FILE = "peer.json"  # experiments.peers.protocol.RESULT_FILE
WARPED_FILE = "warped.nii.gz"  # experiments.peers.protocol.WARPED_FILE; ofg_jax's too
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "XLA_FLAGS")


class UsageError(ValueError):
    """A bad command line: one ``error:`` line, exit status 2."""


class ToolFailed(RuntimeError):
    """A tool's process failed: recorded, and the other runs go on."""


@dataclasses.dataclass(frozen=True)
class Tool:
    """A method: ``venv`` None runs ``ofg_jax.register`` (with ``flags``) in this
    interpreter; else ``python -m <module> <flags>`` with ``<venvs>/<venv>/bin/python``."""
    name: str
    label: str
    venv: Optional[str]
    module: str
    flags: tuple[str, ...] = ()

    @property
    def is_ofg(self) -> bool:
        return self.module == "ofg_jax.register"


TOOLS = {tool.name: tool for tool in (
    Tool("ofg_jax", "ofg_jax (default)", None, "ofg_jax.register"),
    Tool("ants_syn_cc", "ANTs antsRegistrationSyN[s] (CC)", "ants",
         "experiments.peers.run_ants", ("--recipe=antsRegistrationSyN[s]",)),
    Tool("ofg_jax_displacement", "ofg_jax (displacement, folds)", None,
         "ofg_jax.register", ("--nodiffeomorphic",)),
    Tool("ofg_jax_2mm", "ofg_jax (on a 2 mm working grid)", None, "ofg_jax.register",
         ("--voxel-size=2",)),
    Tool("fireants", "FireANTs (moments, affine, greedy CC; CPU)", "fireants",
         "experiments.peers.run_fireants"),
    Tool("syntx", "syntx (JAX: affine + SyN LNCC)", "syntx",
         "experiments.peers.run_syntx"),
    Tool("ants_syn", "ANTs SyN (antspyx default, MI)", "ants",
         "experiments.peers.run_ants", ("--recipe=SyN",)),
)}
# Checks of the path from a tool's process to the scores (not run by default).
EXTRA_TOOLS = {"identity": Tool("identity", "identity (through a tool's process)",
                                None, "experiments.peers.run_identity")}
REFERENCES = ("no registration", "ofg_jax affine only", "the known answer")


# Command lines and processes.

def available_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def tool_command(tool: Tool, paths: dict[str, str], out: str, threads: int,
                 venvs: str) -> list[str]:
    """The tool's command line (raises UsageError for a missing virtualenv)."""
    if tool.venv is None:
        python = sys.executable
    else:
        python = os.path.join(venvs, tool.venv, "bin", "python")
        if not os.path.isfile(python):
            raise UsageError(f"{tool.name} needs {python}: create the virtualenv "
                             f"{os.path.join(venvs, tool.venv)} (see the docstring of "
                             f"experiments/{NAME}.py) or pass --venvs")
    if tool.is_ofg:
        return [python, "-m", tool.module, "--affine", f"--moving={paths['moving']}",
                f"--fixed={paths['fixed']}", f"--out={out}", *tool.flags]
    return [python, "-m", tool.module, f"--fixed={paths['fixed']}",
            f"--moving={paths['moving']}", f"--out={out}", f"--threads={threads}",
            *tool.flags]


def tool_environment(tool: Tool, threads: int, cache: str, venvs: str) -> dict[str, str]:
    """The environment of a tool's process: threads, cold/warm caches, its venv."""
    env = dict(os.environ)
    for name in THREAD_VARIABLES[:-1]:
        env[name] = str(threads)
    # XLA sizes its CPU thread pool by the CPUs the process may run on; its flag
    # for Eigen's threads is set, and so is syntx's intra_op_parallelism_threads
    # (which XLA ignores: not a flag of its own), so that syntx's own default of
    # 8 (os.environ.setdefault) does not apply.
    env["XLA_FLAGS"] = " ".join(filter(None, (
        env.get("XLA_FLAGS", ""), "--xla_cpu_multi_thread_eigen="
        + ("true" if threads > 1 else "false"), f"intra_op_parallelism_threads={threads}")))
    env.update(XDG_CACHE_HOME=cache, TORCHINDUCTOR_CACHE_DIR=os.path.join(
        cache, "torchinductor"), PYTHONPATH=REPO_ROOT, PYTHONUNBUFFERED="1")
    if tool.venv is not None:
        venv = os.path.join(venvs, tool.venv)
        env["VIRTUAL_ENV"] = venv
        env["PATH"] = os.path.join(venv, "bin") + os.pathsep + env.get("PATH", "")
    return env


@contextlib.contextmanager
def pinned(cpus: Sequence[int]):
    """This thread (and so the processes it starts) on ``cpus`` while active.

    The child inherits the mask of the thread that starts it: no ``preexec_fn``,
    which would run Python in a forked copy of a multithreaded (JAX) process.
    """
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


def run_process(command: Sequence[str], env: dict[str, str], log_path: str,
                cpus: Sequence[int]) -> dict[str, Any]:
    """Runs ``command`` (cwd: the repository, output to ``log_path``) pinned to
    ``cpus``: ``{returncode, wall_seconds, peak_rss_mb, load_average_before,
    load_average_after}``. The peak is ``wait4``'s max RSS: that of the largest
    process of the tree (the child and the descendants it waited for)."""
    before = list(os.getloadavg())
    with open(log_path, "w") as log, pinned(cpus):
        start = time.perf_counter()
        process = subprocess.Popen(list(command), cwd=REPO_ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.kill()
            process.wait()
            raise
        wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": process.returncode, "wall_seconds": wall,
            "peak_rss_mb": usage.ru_maxrss / 1024.0, "load_average_before": before,
            "load_average_after": list(os.getloadavg())}


def _tail(path: str, lines: int = 15) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


# What each tool reports.

def _number(pattern: str, text: str, group: int = 1) -> Optional[float]:
    match = re.search(pattern, text, re.M)
    return float(match.group(group)) if match else None


def ofg_report(log: str) -> dict[str, Any]:
    """ofg_jax's seconds from its log (None where a line is not found): the affine
    and the optimisation without compilation (``registration_seconds``: their
    sum, else the pair's time less its compilation), and its settings."""
    affine = _number(r"^affine .*; (\S+) s, and \S+ s compiling", log)
    optimisation = _number(r"^optimisation: (\S+) s", log)
    total = _number(r"^time: (\S+) s for this pair", log)
    compiling = _number(r"^time: \S+ s for this pair, (\S+) s", log)
    if affine is not None and optimisation is not None:
        seconds = affine + optimisation
    elif total is not None and compiling is not None:
        seconds = total - compiling
    else:
        seconds = None
    path = re.search(r"^path: (.*)$", log, re.M)
    return {"registration_seconds": seconds, "affine_seconds": affine,
            "optimisation_seconds": optimisation, "pair_seconds": total,
            "compile_seconds": compiling, "recipe": path.group(1) if path else None}


def ofg_version() -> Optional[str]:
    """The repository's commit (``git describe --always --dirty``), or None."""
    try:
        done = subprocess.run(["git", "-C", REPO_ROOT, "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def peer_report(out: str) -> dict[str, Any]:
    path = os.path.join(out, RESULT_FILE)
    if not os.path.isfile(path):
        raise ToolFailed(f"{path} not written")
    with open(path) as f:
        return json.load(f)


# Transforms in the scoring form.

def fixed_image(pair_dir: str):
    import nibabel as nib
    return nib.load(os.path.join(pair_dir, "fixed.nii.gz"))


def on_fixed_grid(field: np.ndarray, image, path: str, pair_dir: str) -> np.ndarray:
    """``field`` (read from ``path``), checked to lie on the pair's fixed grid."""
    fixed = fixed_image(pair_dir)
    if field.shape[:3] != tuple(fixed.shape[:3]) or not np.allclose(
            image.affine, fixed.affine, atol=1e-3):
        raise ToolFailed(f"{path}: a field of shape {field.shape[:3]} and affine "
                         f"{np.round(image.affine, 3).tolist()} is not on the fixed grid "
                         f"{tuple(fixed.shape[:3])}, {np.round(fixed.affine, 3).tolist()}")
    return field


def load_transform(tool: Tool, out: str, pair_dir: str
                   ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """``(field_lps, matrix)`` of :func:`brain_pairs.score` from a run's folder:
    ofg_jax's ``transform.nii.gz`` and ``affine.mat``; a peer's whole transform,
    its ITK displacement field ``field.nii.gz`` (no matrix)."""
    if tool.is_ofg:
        from ofg_jax.registration import transforms
        transform = transforms.load_transform(out)
        return on_fixed_grid(transform.field_lps, transform.field_image,
                             os.path.join(out, "transform.nii.gz"),
                             pair_dir), transform.matrix
    from ofg_jax.registration import geometry
    path = os.path.join(out, FIELD_FILE)
    field, image = geometry.read_itk_displacement(path)
    return on_fixed_grid(field, image, path, pair_dir), None


def points_to_field(points_ras: np.ndarray, fixed_affine: np.ndarray) -> np.ndarray:
    """The ITK field (LPS mm) of a dense map: the moving world point (RAS mm) of
    each fixed voxel (``truth.npy``)."""
    from ofg_jax.registration import geometry
    shape = points_ras.shape[:3]
    voxels = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return ((points_ras - geometry.apply_affine(fixed_affine, voxels))
            * geometry.RAS_TO_LPS).astype(np.float32)


def warped_agreement(pair_dir: str, field: np.ndarray, matrix: Optional[np.ndarray],
                     warped_path: str) -> Optional[float]:
    """The correlation, over the fixed brain, of the moving image as the tool
    resampled it (``warped_path``) and as the scoring resamples it through the
    converted transform: close to 1 when the conversion is right (None when the
    tool wrote no such image)."""
    import nibabel as nib
    from ofg_jax.registration import geometry
    if not os.path.isfile(warped_path):
        return None
    moving = nib.load(os.path.join(pair_dir, "moving.nii.gz"))
    ours = np.asarray(geometry.sample_through(
        np.asarray(moving.dataobj, np.float32), moving.affine, field,
        fixed_image(pair_dir).affine, matrix=matrix, order=1))
    theirs = np.asarray(nib.load(warped_path).dataobj, np.float32).reshape(ours.shape)
    brain = np.asarray(nib.load(os.path.join(pair_dir, "fixed_seg.nii.gz")).dataobj) > 0
    return float(np.corrcoef(ours[brain], theirs[brain])[0, 1])


# One tool on one pair.

def run_tool(tool: Tool, pair_dir: str, work: str, threads: int, runs: int,
             venvs: str) -> dict[str, Any]:
    """Runs ``tool`` ``runs`` times on the pair (fresh cache, then warm) and scores
    the last run's transform. Raises ToolFailed."""
    from experiments import brain_pairs
    paths = {key: os.path.join(pair_dir, f"{key}.nii.gz") for key in ("moving", "fixed")}
    root = os.path.join(work, "runs", os.path.basename(pair_dir), tool.name)
    cache = os.path.join(root, "cache")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(cache)
    cpus = available_cpus()[:threads]
    env = tool_environment(tool, threads, cache, venvs)
    attempts = []
    for index in range(runs):
        out = os.path.join(root, f"run{index + 1}")
        os.makedirs(out)
        command = tool_command(tool, paths, out, threads, venvs)
        log_path = os.path.join(out, "log.txt")
        process = run_process(command, env, log_path, cpus)
        process.update(command=shlex.join(command), out=out)
        attempts.append(process)
        if process["returncode"]:
            raise ToolFailed(f"{tool.name} on {os.path.basename(pair_dir)} exited with "
                             f"{process['returncode']} (log {log_path}):\n"
                             f"{_tail(log_path)}")
        if tool.is_ofg:
            with open(log_path, errors="replace") as f:
                process["report"] = dict(ofg_report(f.read()), version=ofg_version())
        else:
            process["report"] = peer_report(out)
    last = attempts[-1]
    field, matrix = load_transform(tool, last["out"], pair_dir)
    record = dict(brain_pairs.score(pair_dir, field, matrix))
    record["warped_agreement"] = warped_agreement(pair_dir, field, matrix, os.path.join(
        last["out"], WARPED_FILE))
    if tool.is_ofg and not tool.flags:
        record["affine_only"] = brain_pairs.score(pair_dir, None, matrix)
    record.update(
        environment={name: env.get(name) for name in THREAD_VARIABLES},
        registration_seconds=last["report"].get("registration_seconds"),
        process_seconds_cold=attempts[0]["wall_seconds"],
        process_seconds_warm=last["wall_seconds"] if runs > 1 else None,
        peak_rss_mb=max(a["peak_rss_mb"] for a in attempts),
        recipe=last["report"].get("recipe"), version=last["report"].get("version"),
        runs=attempts)
    return record


# The experiment.

def pair_description(pair_dir: str) -> str:
    import nibabel as nib
    parts = []
    for role in ("moving", "fixed"):
        image = nib.load(os.path.join(pair_dir, f"{role}.nii.gz"))
        zooms = "x".join(f"{z:g}" for z in image.header.get_zooms()[:3])
        parts.append(f"{role} {'x'.join(map(str, image.shape[:3]))} at {zooms} mm "
                     f"{''.join(nib.aff2axcodes(image.affine))}")
    return ", ".join(parts)


def reference_records(pair: str, pair_dir: str) -> list[dict[str, Any]]:
    """No registration and, for a pair with a known answer, the known answer."""
    from experiments import brain_pairs
    records = [dict(brain_pairs.score(pair_dir, None, None), pair=pair,
                    tool="reference", label="no registration")]
    truth = os.path.join(pair_dir, "truth.npy")
    if os.path.isfile(truth):
        field = points_to_field(np.load(truth), fixed_image(pair_dir).affine)
        records.append(dict(brain_pairs.score(pair_dir, field, None), pair=pair,
                            tool="reference", label="the known answer"))
    return records


COLUMNS = (("dice", "Dice", 3), ("dice_gm", "GM", 3), ("dice_wm", "WM", 3),
           ("hd95_mm", "HD95 mm", 2), ("det_le0_brain_pct", "% det ≤ 0", 3),
           ("sdlogj_brain", "SDlogJ", 3), ("error_mm", "error mm", 2),
           ("registration_seconds", "s registration", 1),
           ("process_seconds_cold", "s process, cold", 1),
           ("process_seconds_warm", "s process, warm", 1), ("peak_rss_mb", "peak MB", 0))


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}"


def table(records: Sequence[dict], pairs: Sequence[str], pair_dirs: dict[str, str]
          ) -> str:
    """Markdown: one table per pair, the references first, then the tools in order."""
    sections = []
    for pair in pairs:
        rows = []
        for record in records:
            if record["pair"] != pair:
                continue
            if "error" in record:
                rows.append([record["label"], f"failed: {record['error'].splitlines()[0]}"]
                            + [""] * (len(COLUMNS) - 1))
            else:
                rows.append([record["label"]] + [_cell(record.get(key), digits)
                                                 for key, _, digits in COLUMNS])
        if not rows:
            continue
        from experiments import common
        sections.append(f"#### {pair}\n\n{pair_description(pair_dirs[pair])}\n\n"
                        + common.markdown_table(["method"] + [h for _, h, _ in COLUMNS],
                                                rows))
    return "\n\n".join(sections)


def sort_records(records: Sequence[dict], pairs: Sequence[str], tools: Sequence[str]
                 ) -> list[dict]:
    def key(record):
        order = (REFERENCES.index(record["label"]) if record["tool"] == "reference"
                 else len(REFERENCES) + tools.index(record["tool"]))
        return pairs.index(record["pair"]), order
    return sorted(records, key=key)


def prepare_pairs(names: Sequence[str], pairs_dir: str, data: Optional[str]
                  ) -> dict[str, str]:
    """``{name: folder}``: the pairs in ``pairs_dir``, the missing ones built from
    ``data`` (raises UsageError when it cannot)."""
    from experiments import brain_pairs
    folders = {name: os.path.join(pairs_dir, name) for name in names}
    missing = [name for name, folder in folders.items()
               if not os.path.isfile(os.path.join(folder, "fixed_seg.nii.gz"))]
    unknown = [name for name in missing if name not in brain_pairs.PAIRS]
    if unknown:
        raise UsageError(f"no pair {', '.join(unknown)} in {pairs_dir} (the pairs that "
                         f"can be built: {', '.join(brain_pairs.PAIRS)})")
    if missing:
        if data is None:
            raise UsageError(f"the pairs {', '.join(missing)} are not in {pairs_dir}: "
                             "pass --data (the subject's .npz) to build them")
        if not os.path.isfile(data):
            raise UsageError(f"--data {data} not found")
        print(f"building {', '.join(missing)} in {pairs_dir}", file=sys.stderr, flush=True)
        try:
            brain_pairs.make_pairs(data, pairs_dir, missing)
        except ImportError as e:
            raise UsageError(f"building the pairs needs nilearn (its MNI152 template): "
                             f"{e}") from e
    return folders


def _names(text: str, flag: str, known: Sequence[str]) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UsageError(f"{flag} is empty")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UsageError(f"{flag} names {', '.join(duplicates)} twice")
    unknown = [name for name in names if known and name not in known]
    if unknown:
        raise UsageError(f"{flag}: unknown {', '.join(unknown)} (known: "
                         f"{', '.join(known)})")
    return names


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    from experiments import brain_pairs
    parser = _Parser(description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join("workdir", NAME),
                        help="output folder (default workdir/registration_peers)")
    parser.add_argument("--pairs-dir", default=os.path.join("workdir", "brain_pairs"),
                        help="folder of the pair folders (default workdir/brain_pairs)")
    parser.add_argument("--data", help="the subject's .npz, to build missing pairs")
    parser.add_argument("--pairs", default=",".join(brain_pairs.PAIRS),
                        help="comma-separated pair folders (default all: "
                             f"{','.join(brain_pairs.PAIRS)})")
    parser.add_argument("--tools", default=",".join(TOOLS),
                        help=f"comma-separated, in the order run (default all: "
                             f"{','.join(TOOLS)}; also {','.join(EXTRA_TOOLS)})")
    parser.add_argument("--venvs", default="/tmp/peer-venvs",
                        help="folder of the tools' virtualenvs ants, fireants, syntx "
                             "(default /tmp/peer-venvs)")
    parser.add_argument("--threads", type=int, default=len(available_cpus()),
                        help="threads (and CPUs) of every tool (default: the CPUs "
                             "this process may use)")
    parser.add_argument("--runs", type=int, default=2,
                        help="runs per tool and pair: the first cold, the others warm "
                             "(default 2)")
    parser.add_argument("--force", action="store_true",
                        help="run again the (tool, pair) whose JSON exists")
    parser.add_argument("--tables-only", action="store_true",
                        help="run nothing: the tables of the (tool, pair) whose JSON "
                             "exists in --out, the others left out")
    args = parser.parse_args(argv)
    args.pairs = _names(args.pairs, "--pairs", ())
    args.tools = _names(args.tools, "--tools", list(TOOLS) + list(EXTRA_TOOLS))
    if not 1 <= args.threads <= len(available_cpus()):
        raise UsageError(f"--threads must be between 1 and {len(available_cpus())} "
                         f"(the CPUs this process may use), not {args.threads}")
    if args.force and args.tables_only:
        raise UsageError("--force runs again, --tables-only runs nothing: not both")
    if args.runs < 1:
        raise UsageError(f"--runs must be >= 1, not {args.runs}")
    if not os.path.isdir(args.pairs_dir) and args.data is None:
        raise UsageError(f"--pairs-dir {args.pairs_dir} not found (pass --data to "
                         "build the pairs there)")
    for name in args.tools:
        tool = {**TOOLS, **EXTRA_TOOLS}[name]
        if tool.venv is not None and not args.tables_only:
            tool_command(tool, {"moving": "", "fixed": ""}, "", 1, args.venvs)
    return args


def run(argv: Sequence[str]) -> dict[str, Any]:
    """The experiment; returns what it writes to ``registration_peers.json``."""
    from experiments.timing import cpu_description
    args = parse_args(argv)
    tools = {**TOOLS, **EXTRA_TOOLS}
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_before = list(os.getloadavg())
    folders = prepare_pairs(args.pairs, args.pairs_dir, args.data)
    json_dir = os.path.join(args.out, "json")
    os.makedirs(json_dir, exist_ok=True)
    records = []
    for pair, pair_dir in folders.items():
        records += reference_records(pair, pair_dir)
        for name in args.tools:
            tool = tools[name]
            path = os.path.join(json_dir, f"{pair}__{name}.json")
            record = None
            if os.path.isfile(path) and not args.force:
                with open(path) as f:
                    record = json.load(f)
                if "error" in record:  # A failed run is tried again.
                    record = None
                else:
                    print(f"{pair}: {name}: reusing {path}", file=sys.stderr, flush=True)
            if record is None and args.tables_only:
                print(f"{pair}: {name}: no record, left out", file=sys.stderr, flush=True)
                continue
            if record is None:
                print(f"{pair}: {name} ({args.runs} run(s), {args.threads} threads)",
                      file=sys.stderr, flush=True)
                record = {"pair": pair, "tool": name, "label": tool.label,
                          "threads": args.threads, "date": date}
                try:
                    record.update(run_tool(tool, pair_dir, args.out, args.threads,
                                           args.runs, args.venvs))
                except (ToolFailed, OSError, ValueError) as e:
                    record["error"] = str(e)
                    print(f"{pair}: {name} failed: {e}", file=sys.stderr, flush=True)
                with open(path, "w") as f:
                    json.dump(record, f, indent=1, default=float)
            affine_only = record.get("affine_only")
            if affine_only is not None:
                records.append(dict(affine_only, pair=pair, tool="reference",
                                    label="ofg_jax affine only"))
            records.append(record)
    records = sort_records(records, args.pairs, args.tools)
    text = table(records, args.pairs, folders)
    command = shlex.join(["python", "-m", f"experiments.{NAME}", *argv])
    payload = {"experiment": NAME, "date": date, "machine": cpu_description(),
               "command": command, "threads": args.threads, "runs": args.runs,
               "load_average_before": load_before,
               "load_average_after": list(os.getloadavg()),
               "pairs": folders, "tools": {name: dataclasses.asdict(tools[name])
                                           for name in args.tools},
               "out": args.out, "records": records, "table": text}
    with open(os.path.join(args.out, f"{NAME}.json"), "w") as f:
        json.dump(payload, f, indent=1, default=float)
    dates = sorted({r["date"] for r in records if "date" in r and r["date"] != date})
    if dates:  # Records reused from earlier runs.
        date = f"{date}, with records of {', '.join(dates)}"
    loads = (f"load average (1 min) {load_before[0]:.2f} before, "
             f"{payload['load_average_after'][0]:.2f} after")
    if args.tables_only:
        loads = "the load averages of each run in the JSON"
    header = (f"### {NAME}\n\n`{command}`\n\n{date}; {payload['machine']}; "
              f"{args.threads} threads per tool; registration seconds from a tool's "
              "last run, process seconds of its first run (cold) and of its last "
              "(warm, where it ran more than once; the runs of each record are in "
              f"{NAME}.json); {loads}\n\n")
    with open(os.path.join(args.out, f"{NAME}.md"), "w") as f:
        f.write(header + text + "\n")
    print(text)
    failed = [r for r in records if "error" in r]
    if failed:
        payload["failed"] = [f"{r['pair']}: {r['tool']}" for r in failed]
    return payload


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        payload = run(argv)
    except UsageError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)
    except (OSError, ValueError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(1)
    if payload.get("failed"):
        print(f"error: failed: {'; '.join(payload['failed'])} (their logs: "
              f"{os.path.join(payload['out'], 'runs')})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
