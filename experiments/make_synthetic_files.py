"""Writes synthetic phantoms as an OASIS-style ``.pkl`` dataset, in parallel.

The built-in ``synthetic`` dataset renders every subject when it is loaded, which
at 160x192x224 takes seconds per volume: more than a GPU training step. For a
training run on a fast device this writes the same phantoms once, with one
process per core, in the layout of the ``oasis`` dataset (``docs/datasets.md``):
``ROOT/Train/<i>.pkl`` holds ``(image, seg)``, ``ROOT/Val/p_<i>_<j>.pkl`` holds
``(moving, fixed, moving_seg, fixed_seg)``. The 26 phantom labels lie within
OASIS's 1..35.

    python -m experiments.make_synthetic_files --root /tmp/phantoms \\
        --img-size 160,192,224 --num-train 16 --num-val 2
    python -m ofg_jax.main --config=configs/oasis.py --config.data.root=/tmp/phantoms ...
"""

import argparse
import concurrent.futures
import os
import pickle
from typing import Optional, Sequence

from experiments.timing import parse_shape


def _dataset(img_size, num_train):
    from ofg_jax.configs import demo
    from ofg_jax.data import synthetic
    config = demo.get_config()
    config.data.img_size = tuple(img_size)
    config.data.num_train = num_train
    return synthetic.Synthetic.from_config(config.data, 0)


def _write(job):
    root, img_size, kind, index, count = job
    data = _dataset(img_size, count if kind == "train" else 1)
    if kind == "train":
        image, seg = data.subject("train", index)
        path = os.path.join(root, "Train", f"{index:04d}.pkl")
        payload = (image, seg)
    else:  # a validation pair: validation subject `index` -> the next one
        moving, moving_seg = data.subject("val", index)
        fixed, fixed_seg = data.subject("val", (index + 1) % count)
        path = os.path.join(root, "Val", f"p_{index:04d}_{(index + 1) % count:04d}.pkl")
        payload = (moving, fixed, moving_seg, fixed_seg)
    with open(path, "wb") as f:
        pickle.dump(payload, f, protocol=4)
    return path


def main(argv: Optional[Sequence[str]] = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--img-size", default="160,192,224")
    parser.add_argument("--num-train", type=int, default=16)
    parser.add_argument("--num-val", type=int, default=2)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    img_size = parse_shape(args.img_size)
    data = _dataset(img_size, 1)
    if args.num_train < 2 or not 2 <= args.num_val <= data.val_subjects:
        parser.error(f"need --num-train >= 2 and 2 <= --num-val <= {data.val_subjects}")
    for folder in ("Train", "Val"):
        os.makedirs(os.path.join(args.root, folder), exist_ok=True)
    jobs = ([(args.root, img_size, "train", i, args.num_train) for i in range(args.num_train)]
            + [(args.root, img_size, "val", i, args.num_val) for i in range(args.num_val)])
    with concurrent.futures.ProcessPoolExecutor(max(1, args.workers)) as pool:
        paths = list(pool.map(_write, jobs))
    print(f"wrote {len(paths)} files under {args.root}")
    return paths


if __name__ == "__main__":
    main()
