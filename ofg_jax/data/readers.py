"""Reading volumes from disk with errors that name the file and the expected layout."""

import os
import pickle

import numpy as np

from ofg_jax.data.base import DEMO_HINT


def missing(path: str, what: str, layout: str) -> FileNotFoundError:
    """The error for a missing file or folder of a dataset layout."""
    return FileNotFoundError(
        f"{what} not found: {path}\nExpected layout:\n{layout}\n{DEMO_HINT}")


def require_dir(path: str, what: str, layout: str) -> str:
    """Returns ``path`` if it is a directory, else raises :func:`missing`."""
    if not os.path.isdir(path):
        raise missing(path, what, layout)
    return path


def require_file(path: str, what: str, layout: str) -> str:
    """Returns ``path`` if it is a file, else raises :func:`missing`."""
    if not os.path.isfile(path):
        raise missing(path, what, layout)
    return path


def list_files(folder: str, suffix: str, what: str, layout: str) -> list[str]:
    """Sorted paths of the files in ``folder`` ending in ``suffix``; at least one."""
    require_dir(folder, f"{what} folder", layout)
    names = sorted(n for n in os.listdir(folder)
                   if n.endswith(suffix) and os.path.isfile(os.path.join(folder, n)))
    if not names:
        raise FileNotFoundError(
            f"{what} folder {folder} holds no '*{suffix}' files\nExpected layout:\n{layout}"
            f"\n{DEMO_HINT}")
    return [os.path.join(folder, n) for n in names]


def read_pkl(path: str, num_arrays: int) -> tuple[np.ndarray, ...]:
    """Reads a pickled tuple of ``num_arrays`` arrays (the TransMorph ``.pkl`` format).

    Only open files you trust: unpickling can run arbitrary code.
    """
    try:
        with open(path, "rb") as f:
            content = pickle.load(f)
    except FileNotFoundError:
        raise
    except Exception as e:  # unpickling raises many exception types
        raise ValueError(f"could not read pickle file {path}: {type(e).__name__}: {e}") from e
    if not isinstance(content, (tuple, list)) or len(content) != num_arrays:
        kind = (f"a {type(content).__name__} of length {len(content)}"
                if isinstance(content, (tuple, list)) else f"a {type(content).__name__}")
        raise ValueError(f"{path} should hold a tuple of {num_arrays} arrays, got {kind}")
    return tuple(np.asarray(a) for a in content)

