"""The documentation cannot rot: its examples run and its API reference is complete.

Every ```python block of README.md and docs/*.md is run, page by page and in
order, in a fresh folder by a fresh interpreter. A page whose examples use files
(scans, a trained workdir, a saved registration) gets them first, made the way
the page's own commands make them.
"""

import ast
import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests import registration_fixtures

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks(page: pathlib.Path) -> list[str]:
    return PYTHON_BLOCK.findall(page.read_text())


def run(args, cwd, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def registration_files(folder: pathlib.Path, trained_workdir: str) -> None:
    """``scans/``, ``workdir/tiny`` and ``out/``: the example of the registration guide."""
    registration_fixtures.write_scans(str(folder / "scans"), seed=3)
    (folder / "workdir").mkdir()
    (folder / "workdir" / "tiny").symlink_to(trained_workdir)
    proc = run([sys.executable, "-m", "ofg_jax.register", "--workdir=workdir/tiny",
                "--moving=scans/moving.nii.gz", "--fixed=scans/fixed.nii.gz",
                "--moving-seg=scans/moving_seg.nii.gz",
                "--fixed-seg=scans/fixed_seg.nii.gz", "--affine", "--inverse",
                "--out=out/"], cwd=folder)
    assert proc.returncode == 0, proc.stderr[-3000:]


def registration_printed(stdout: str) -> None:
    lines = stdout.split()
    assert float(lines[0]) < 1e-4, stdout  # SimpleITK reproduces warped.nii.gz.
    assert lines[1] == "True", stdout  # register_volumes' output is on the fixed grid.


def published_weights_file(folder: pathlib.Path) -> None:
    """``VoxelMorph-2.pth.tar``: a VoxelMorph-2 at 32x48x32, saved as the authors'
    training scripts save theirs."""
    import jax
    import torch
    from ofg_jax import models
    model = models.create("voxelmorph", (32, 48, 32), enc_features=(16, 32, 32, 32),
                          final_features=(32, 16, 16))
    variables = model.init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 32, 48, 32, 2)))
    state_dict = {key: torch.from_numpy(value)
                  for key, value in models.to_torch(model, variables).items()}
    torch.save({"epoch": 1, "state_dict": state_dict, "best_dsc": 0.7, "optimizer": {}},
               folder / "VoxelMorph-2.pth.tar")


# page -> setup(folder, request): the files its examples read.
SETUPS = {"registration.md": lambda folder, request: registration_files(
              folder, request.getfixturevalue("trained_workdir")),
          "published_weights.md": lambda folder, request: published_weights_file(folder)}
CHECKS = {"registration.md": registration_printed}
EXAMPLE_PAGES = [page for page in PAGES if python_blocks(page)]


def test_the_pages_with_examples_are_found():
    names = {page.name for page in EXAMPLE_PAGES}
    assert {"README.md", "primitives.md", "registration.md"} <= names
    assert set(SETUPS) | set(CHECKS) <= names


@pytest.mark.parametrize("page", EXAMPLE_PAGES, ids=lambda page: page.name)
def test_python_examples_run_as_written(page, tmp_path, request):
    if page.name in SETUPS:
        SETUPS[page.name](tmp_path, request)
    script = "\n\n".join(python_blocks(page))
    ast.parse(script)  # A syntax error is reported with the page, not the subprocess.
    proc = run([sys.executable, "-c", script], cwd=tmp_path)
    assert proc.returncode == 0, f"{page.name}:\n{proc.stderr[-3000:]}"
    # Examples that print a similarity before and after registering must improve it.
    for before, after in re.findall(r"NCC (\S+) -> (\S+)", proc.stdout):
        assert float(after) > float(before) + 0.05, proc.stdout
    if page.name in CHECKS:
        CHECKS[page.name](proc.stdout)


# The API reference: every module is documented, every public name has a docstring.

def package_modules() -> list[str]:
    names = []
    for path in sorted((REPO / "ofg_jax").rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if "configs" in parts or parts[-1].startswith("_") and parts[-1] != "__init__":
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def documented_modules() -> set[str]:
    text = "".join(path.read_text() for path in (REPO / "docs" / "api").glob("*.rst"))
    return set(re.findall(r"^\.\. automodule:: ([\w.]+)", text, re.MULTILINE))


def test_the_api_reference_documents_every_module():
    modules = package_modules()
    assert "ofg_jax.warp" in modules and "ofg_jax.models.voxelmorph" in modules
    # The top level re-exports the primitives: docs/api/index.rst lists them.
    missing = sorted(set(modules) - {"ofg_jax"} - documented_modules())
    assert not missing, f"modules missing from docs/api/*.rst: {missing}"
    assert documented_modules() <= set(modules)


@pytest.mark.parametrize("module", package_modules())
def test_every_public_function_and_class_has_a_docstring(module):
    path = REPO / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = REPO / module.replace(".", "/") / "__init__.py"
    tree = ast.parse(path.read_text())
    assert ast.get_docstring(tree), f"{module} has no module docstring"
    undocumented = [node.name for node in tree.body
                    if isinstance(node, (ast.FunctionDef, ast.ClassDef))
                    and not node.name.startswith("_") and not ast.get_docstring(node)]
    assert not undocumented, f"{module}: no docstring for {undocumented}"


def test_the_top_level_exports_are_in_the_api_reference():
    import ofg_jax
    text = (REPO / "docs" / "api" / "index.rst").read_text()
    missing = [name for name in ofg_jax.__all__ if f".{name}`" not in text]
    assert not missing, missing
