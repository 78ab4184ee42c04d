"""The authors' PyTorch checkpoints of the three networks, in and out.

:func:`from_torch` reads a ``state_dict`` written by the PyTorch code of the
networks' authors (the TransMorph repository's ``VxmDense_1`` / ``VxmDense_2``,
``ViTVNet`` and ``TransMorph``, which the OFG reference code trains too) into
an ``ofg_jax.models`` network and its variables; :func:`to_torch` writes our
variables back as such a ``state_dict``. The two are inverse: every parameter,
every BatchNorm statistic, under the authors' names and in their layouts.

The layouts (PyTorch -> Flax): conv kernels ``(O, I, D, H, W) -> (D, H, W, I,
O)``; linear weights ``(out, in) -> (in, out)``; LayerNorm and BatchNorm
``weight -> scale``; ``running_mean`` / ``running_var`` -> ``batch_stats``
``mean`` / ``var``. The buffers that the configuration determines (the spatial
transformer's ``grid``, the Swin blocks' ``relative_position_index``) are
checked against the configuration on import and recomputed on export, never
trained; BatchNorm's ``num_batches_tracked`` is not used in evaluation and is
written as 0.

What a checkpoint's shapes show is read from it: VoxelMorph's widths
(VoxelMorph-1 against VoxelMorph-2), ViT-V-Net's widths and depth,
TransMorph's width, depths, heads, MLP ratio, qkv bias, window and head
(the OASIS release ends at half resolution, ``half_resolution_flow``) -- so
TransMorph-Large loads too. What no shape shows (ViT-V-Net's number of
heads, dropout rates) keeps the published value unless given as an option.
"""

import collections
import dataclasses
import os
import pickle
import re
import zipfile
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ofg_jax.models.base import RegistrationNetwork
from ofg_jax.models.registry import NETWORKS, create, options
from ofg_jax.models.transmorph import relative_position_index

TORCH_EXTRA = "pip install 'ofg_jax[torch]' (a CPU build of PyTorch is enough)"

# A key that only the authors' model of that network has.
_SIGNATURES = {"voxelmorph": "unet_model.", "vitvnet": "transformer.embeddings.",
               "transmorph": "transformer.patch_embed."}

_Rule = tuple[str, Union[str, Callable[[re.Match], str]]]

# Our module path ("/"-joined, as in the variables) -> the authors' module path.
_MODULES: dict[str, list[_Rule]] = {
    "voxelmorph": [
        (r"enc_(\d+)", r"unet_model.downarm.\1.main"),
        (r"dec_(\d+)", r"unet_model.uparm.\1.main"),
        (r"final_(\d+)", r"unet_model.extras.\1.main"),
        (r"flow", "flow"),
    ],
    "vitvnet": [
        ("", "transformer.embeddings"),  # position_embeddings, a parameter of the root
        # The double convs are Sequentials (conv, ReLU, conv, ReLU): convs at 0 and 2.
        (r"inc/conv_(\d)",
         lambda m: f"transformer.embeddings.hybrid_model.inc.double_conv.{2 * int(m[1])}"),
        (r"down(\d)/conv_(\d)",
         lambda m: (f"transformer.embeddings.hybrid_model.down{m[1]}.maxpool_conv.1."
                    f"double_conv.{2 * int(m[2])}")),
        (r"patch_embeddings", "transformer.embeddings.patch_embeddings"),
        (r"layer_(\d+)/(attention_norm|ffn_norm)", r"transformer.encoder.layer.\1.\2"),
        (r"layer_(\d+)/(fc1|fc2)", r"transformer.encoder.layer.\1.ffn.\2"),
        (r"layer_(\d+)/(query|key|value|out)", r"transformer.encoder.layer.\1.attn.\2"),
        (r"encoder_norm", "transformer.encoder.encoder_norm"),
        # conv-BatchNorm-ReLU Sequentials: the conv at 0, the norm at 1.
        (r"conv_more/conv", "decoder.conv_more.0"),
        (r"conv_more/norm", "decoder.conv_more.1"),
        (r"decoder_(\d+)/conv_(\d)/(conv|norm)",
         lambda m: (f"decoder.blocks.{m[1]}.conv{int(m[2]) + 1}."
                    f"{0 if m[3] == 'conv' else 1}")),
        (r"flow", "reg_head.0"),
    ],
    "transmorph": [
        (r"patch_embed", "transformer.patch_embed.proj"),
        (r"patch_norm", "transformer.patch_embed.norm"),
        (r"stage(\d+)_block(\d+)/(norm1|norm2|attn)", r"transformer.layers.\1.blocks.\2.\3"),
        (r"stage(\d+)_block(\d+)/attn/(qkv|proj)",
         r"transformer.layers.\1.blocks.\2.attn.\3"),
        (r"stage(\d+)_block(\d+)/(fc1|fc2)", r"transformer.layers.\1.blocks.\2.mlp.\3"),
        (r"merge(\d+)/(norm|reduction)", r"transformer.layers.\1.downsample.\2"),
        (r"norm(\d+)", r"transformer.norm\1"),
        # conv-InstanceNorm-LeakyReLU Sequentials: only the conv (at 0) has weights.
        (r"up(\d+)/conv_(\d)/conv", lambda m: f"up{m[1]}.conv{int(m[2]) + 1}.0"),
        (r"(c1|c2)/conv", r"\1.0"),
        (r"flow", "reg_head.0"),
    ],
}

# The spatial transformer's sampling grid: a buffer of every model, unused here.
_GRID = {"voxelmorph": "transformer.grid", "vitvnet": "spatial_trans.grid",
         "transmorph": "spatial_trans.grid"}

# Our leaf name -> the authors' (``batch_stats`` leaves included).
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
           "var": "running_var"}


# Axes of our kernels, by rank, in the authors' order: conv (D, H, W, I, O) ->
# (O, I, D, H, W); linear (in, out) -> (out, in).
_TO_TORCH = {5: (4, 3, 0, 1, 2), 2: (1, 0)}


@dataclasses.dataclass(frozen=True)
class _Parameter:
    """One of our variables and the authors' key of it."""
    path: tuple[str, ...]  # (collection, *modules, leaf)
    key: str
    shape: tuple[int, ...]  # ours

    @property
    def torch_shape(self) -> tuple[int, ...]:
        if self.path[-1] == "kernel" and len(self.shape) in _TO_TORCH:
            return tuple(self.shape[i] for i in _TO_TORCH[len(self.shape)])
        return self.shape


@dataclasses.dataclass(frozen=True)
class _Buffer:
    """A state_dict entry that is not one of our variables.

    ``value`` is what export writes; with ``derived`` an import checks the
    checkpoint's values against it, else only its shape.
    """
    value: np.ndarray
    derived: bool


def _to_torch(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim in _TO_TORCH:
        return value.transpose(_TO_TORCH[value.ndim])
    return value


def _from_torch(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim in _TO_TORCH:
        return value.transpose(np.argsort(_TO_TORCH[value.ndim]))
    return value


def _torch_key(name: str, path: tuple[str, ...]) -> str:
    """The authors' key of our variable ``path`` = (collection, *modules, leaf)."""
    module, leaf = "/".join(path[1:-1]), path[-1]
    for pattern, replacement in _MODULES[name]:
        match = re.fullmatch(pattern, module)
        if match:
            prefix = match.expand(replacement) if isinstance(replacement, str) else \
                replacement(match)
            return f"{prefix}.{_LEAVES.get(leaf, leaf)}" if prefix else _LEAVES.get(leaf, leaf)
    raise AssertionError(f"no PyTorch name for {name} variable {'/'.join(path)}")


def _grid(img_size: Sequence[int]) -> np.ndarray:
    """The spatial transformer's buffer: voxel coordinates ``(1, 3, *img_size)``."""
    axes = [np.arange(n, dtype=np.float32) for n in img_size]
    return np.stack(np.meshgrid(*axes, indexing="ij"))[None]


def _layout(name: str, model: RegistrationNetwork
            ) -> tuple[list[_Parameter], dict[str, _Buffer]]:
    """The authors' state_dict of ``model``: our variables with their keys, and
    the entries that are not variables of ours."""
    flat = traverse_util.flatten_dict(model.variable_shapes())
    parameters = [_Parameter(path, _torch_key(name, path), tuple(leaf.shape))
                  for path, leaf in flat.items()]
    buffers = {_GRID[name]: _Buffer(_grid(model.img_size), derived=True)}
    for parameter in parameters:
        if parameter.path[-1] == "mean":  # a BatchNorm: its step counter
            buffers[parameter.key.replace("running_mean", "num_batches_tracked")] = _Buffer(
                np.zeros((), np.int64), derived=False)
        if parameter.path[-1] == "relative_position_bias_table":
            index = relative_position_index(tuple(model.window_size)).astype(np.int64)
            buffers[parameter.key.replace("bias_table", "index")] = _Buffer(index,
                                                                             derived=True)
    if name == "transmorph" and model.half_resolution_flow:
        # The authors' OASIS model builds the full-resolution conv skip c2 but never
        # calls it: its weights are in the state_dict, and mean nothing.
        buffers["c2.0.weight"] = _Buffer(
            np.zeros((model.reg_head_chan, 2, 3, 3, 3), np.float32), derived=False)
    return parameters, buffers


# ---------------------------------------------------------------------------
# Reading checkpoints.


def import_torch():
    """``torch``, or an ``ImportError`` saying which extra installs it."""
    try:
        import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
        raise ImportError(f"reading PyTorch checkpoints needs PyTorch: {TORCH_EXTRA}"
                          ) from None
    return torch


def _numpy_scalars() -> list[Any]:
    """What unpickles NumPy scalars (an ``epoch`` or ``best_dsc`` saved as one),
    under NumPy 2's and NumPy 1's names; it runs no code of the file."""
    multiarray = getattr(np, "_core", None) or np.core
    scalar = multiarray.multiarray.scalar
    dtypes = {type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32)}
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtypes]


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _array(key: str, value: Any) -> np.ndarray:
    if _is_tensor(value):
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()  # bfloat16 has no NumPy type
        value = value.numpy()
    if not isinstance(value, (np.ndarray, np.generic, jax.Array)):
        raise ValueError(f"state_dict entry {key!r} is a {type(value).__name__}, not a "
                         "tensor")
    value = np.asarray(value)
    return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value


def read_checkpoint(checkpoint: Union[str, os.PathLike, Mapping[str, Any]]
                    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The state_dict of a checkpoint, as float32 (and integer) NumPy arrays, and
    the numbers saved beside it (the authors' ``epoch`` and ``best_dsc``).

    Args:
      checkpoint: the path of a file of ``torch.save`` (``.pth``, ``.pth.tar``):
        the authors' ``{'epoch', 'state_dict', 'best_dsc', 'optimizer'}``, or a
        bare state_dict; or such a mapping, already loaded. Files are read onto
        the CPU (the published ones were saved from GPU tensors) with
        ``weights_only=True``: no code in the file runs. Keys that all start
        with ``module.`` (a model saved inside ``nn.DataParallel``) lose it.

    Raises:
      ImportError: a file, and no PyTorch (the message says what to install).
      FileNotFoundError: no such file.
      ValueError: not a checkpoint: unreadable, no state_dict, or an entry that
        is not a tensor (named).
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path} not found")
        torch = import_torch()
        try:
            with torch.serialization.safe_globals(_numpy_scalars()):
                content = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if not zipfile.is_zipfile(path):  # torch.save writes zip archives
                raise ValueError(f"checkpoint {path} is not a PyTorch file") from None
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            raise ValueError(
                f"checkpoint {path} holds objects that torch.load(weights_only=True) "
                f"refuses ({', '.join(unsafe) or ' '.join(str(e).split())[:200]}); if "
                "you trust the file, load it with torch.load(..., weights_only=False) "
                "and pass its state_dict") from None
        except (RuntimeError, EOFError, OSError) as e:
            raise ValueError(f"checkpoint {path} is not a PyTorch file "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:200]})"
                             ) from None
        where = f"checkpoint {path}"
    else:
        content, where = checkpoint, "the checkpoint"
    info = {}
    if isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):
        info = {key: value.item() if isinstance(value, np.generic) else value
                for key, value in content.items() if key in ("epoch", "best_dsc")
                and isinstance(value, (int, float, np.number))}
        content = content["state_dict"]
    if not isinstance(content, Mapping) or not any(
            _is_tensor(value) or isinstance(value, (np.ndarray, jax.Array))
            for value in content.values()):
        raise ValueError(f"{where} holds no state_dict (a mapping of names to tensors, "
                         "or a dict with one under 'state_dict')")
    keys = [str(key) for key in content]
    prefix = "module." if all(key.startswith("module.") for key in keys) else ""
    state_dict = {key[len(prefix):]: _array(key, value)
                  for key, value in zip(keys, content.values())}
    return state_dict, info


def network_of(state_dict: Mapping[str, Any]) -> Optional[str]:
    """The network (one of ``ofg_jax.models.NAMES``) whose authors' layout
    ``state_dict``'s keys show, or None."""
    for name, signature in _SIGNATURES.items():
        if any(key.startswith(signature) for key in state_dict):
            return name
    return None


# ---------------------------------------------------------------------------
# What the shapes show.


def _count(state_dict: Mapping[str, np.ndarray], pattern: str) -> int:
    """How many consecutive ``i`` from 0 have a key matching ``pattern % i``."""
    n = 0
    while any(re.fullmatch(pattern % n, key) for key in state_dict):
        n += 1
    return n


def _widths(state_dict, key: str, n: int) -> tuple[int, ...]:
    """Output channels of ``key % i`` for ``i < n``; stops at the first missing key
    (reported by the key check)."""
    out = []
    for i in range(n):
        if key % i not in state_dict:
            break
        out.append(int(state_dict[key % i].shape[0]))
    return tuple(out)


def _window_of(index: np.ndarray) -> Optional[tuple[int, int, int]]:
    """The window whose ``relative_position_index`` is ``index``, if any."""
    n = index.shape[0]
    for w0 in range(1, n + 1):
        for w1 in range(1, n // w0 + 1):
            if n % (w0 * w1) == 0:
                window = (w0, w1, n // (w0 * w1))
                if np.array_equal(relative_position_index(window), index):
                    return window
    return None


def _shown_options(name: str, sd: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The options of network ``name`` that the checkpoint's keys and shapes show."""
    shown: dict[str, Any] = {}
    if name == "voxelmorph":
        for option, arm in (("enc_features", "downarm"), ("dec_features", "uparm"),
                            ("final_features", "extras")):
            key = f"unet_model.{arm}.%d.main.weight"
            shown[option] = _widths(sd, key, _count(sd, re.escape(key)))
    elif name == "vitvnet":
        hybrid = "transformer.embeddings.hybrid_model."
        encoder = [f"{hybrid}inc.double_conv.2.weight"] + [
            f"{hybrid}down{i}.maxpool_conv.1.double_conv.2.weight" for i in (1, 2)]
        if all(key in sd for key in encoder):
            shown["encoder_channels"] = tuple(int(sd[key].shape[0]) for key in encoder)
        layer = r"transformer\.encoder\.layer\.%d\..*"
        shown["num_layers"] = _count(sd, layer)
        for option, key in (("hidden_size", "transformer.embeddings.patch_embeddings.weight"),
                            ("mlp_dim", "transformer.encoder.layer.0.ffn.fc1.weight"),
                            ("conv_first_channel", "decoder.conv_more.0.weight")):
            if key in sd:
                shown[option] = int(sd[key].shape[0])
        key = "decoder.blocks.%d.conv1.0.weight"
        shown["decoder_channels"] = _widths(sd, key, _count(sd, r"decoder\.blocks\.%d\..*"))
    else:
        layers = _count(sd, r"transformer\.layers\.%d\..*")
        blocks = [_count(sd, rf"transformer\.layers\.{i}\.blocks\.%d\..*")
                  for i in range(layers)]
        shown["depths"] = tuple(blocks)
        first = "transformer.layers.%d.blocks.0.attn."
        heads = [sd[first % i + "relative_position_bias_table"].shape[1] for i in range(layers)
                 if first % i + "relative_position_bias_table" in sd]
        if len(heads) == layers:
            shown["num_heads"] = tuple(int(h) for h in heads)
        if "transformer.patch_embed.proj.weight" in sd:
            embed_dim = int(sd["transformer.patch_embed.proj.weight"].shape[0])
            shown["embed_dim"] = embed_dim
            fc1 = "transformer.layers.0.blocks.0.mlp.fc1.weight"
            if fc1 in sd:
                shown["mlp_ratio"] = sd[fc1].shape[0] / embed_dim
        shown["qkv_bias"] = any(key.endswith(".attn.qkv.bias") for key in sd)
        if "reg_head.0.weight" in sd:
            shown["reg_head_chan"] = int(sd["reg_head.0.weight"].shape[1])
        shown["half_resolution_flow"] = not any(key.startswith("up4.") for key in sd)
        index = first % 0 + "relative_position_index"
        window = _window_of(sd[index]) if index in sd and sd[index].ndim == 2 else None
        if window is not None:
            shown["window_size"] = window
    return shown


# ---------------------------------------------------------------------------
# The two directions.


def _first(keys: Sequence[str], n: int = 4) -> str:
    listed = ", ".join(keys[:n])
    return listed + (f" and {len(keys) - n} more" if len(keys) > n else "")


def from_torch(checkpoint: Union[str, os.PathLike, Mapping[str, Any]], name: str,
               img_size: Optional[Sequence[int]] = None, **overrides
               ) -> tuple[RegistrationNetwork, dict[str, Any]]:
    """Our network ``name`` with the weights of the authors' PyTorch checkpoint.

    ``model.apply(variables, x)`` then takes our input ``(B, D, H, W, 2)``
    (channels-last, moving image first) and returns the displacement
    ``(B, D, H, W, 3)`` in voxels that the authors' ``warped, flow =
    model(torch.cat((moving, fixed), 1))`` returns as ``flow`` (channels first).

    Args:
      checkpoint: a ``.pth`` / ``.pth.tar`` file or a loaded mapping
        (:func:`read_checkpoint`).
      name: ``"voxelmorph"``, ``"vitvnet"`` or ``"transmorph"``.
      img_size: ``(D, H, W)``; None: the grid the checkpoint was built for
        (its spatial transformer's ``grid``).
      **overrides: network options (``ofg_jax.models.options``), e.g.
        ``dtype``, or ``num_heads`` of a ViT-V-Net with other heads than 12.
        They take precedence over what the checkpoint's shapes show (module
        docstring); one that contradicts the checkpoint fails its checks.

    Returns:
      ``(model, variables)``: ``variables`` holds ``params`` (and ViT-V-Net's
      ``batch_stats``), float32.

    Raises:
      ImportError: a file to read, and no PyTorch.
      FileNotFoundError: no such file.
      ValueError: before anything is built, naming the first offending keys: a
        checkpoint of another network, missing or unexpected keys, shapes that
        do not fit ``img_size`` and the options, or derived buffers (grid,
        relative position index) of another configuration.
    """
    options(name)  # an unknown name
    state_dict, _ = read_checkpoint(checkpoint)
    found = network_of(state_dict)
    if found != name:
        what = (f"a {found} (keys {_SIGNATURES[found]}*)" if found else
                f"none of the networks (first keys {_first(list(state_dict))})")
        raise ValueError(f"the checkpoint holds {what}, not a {name}")
    if img_size is None:
        grid = state_dict.get(_GRID[name])
        if grid is None or grid.ndim != 5:
            raise ValueError(f"the checkpoint has no {_GRID[name]} to read its grid from; "
                             "give img_size")
        img_size = grid.shape[2:]
    chosen = {**_shown_options(name, state_dict), **overrides}
    model = create(name, img_size, **chosen)
    parameters, buffers = _layout(name, model)
    described = f"{name} at img_size {tuple(model.img_size)}"

    expected = [p.key for p in parameters] + list(buffers)
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in set(expected)]
    if missing or unexpected:
        parts = ([f"missing keys {_first(missing)}"] if missing else []) + (
            [f"unexpected keys {_first(unexpected)}"] if unexpected else [])
        raise ValueError(f"the checkpoint does not fit {described}: {'; '.join(parts)}")
    wanted = {p.key: p.torch_shape for p in parameters}
    wanted.update({key: buffer.value.shape for key, buffer in buffers.items()})
    wrong = [key for key in state_dict if tuple(state_dict[key].shape) != wanted[key]]
    if wrong:
        shapes = "; ".join(f"{key} is {tuple(state_dict[key].shape)}, expected "
                           f"{wanted[key]}" for key in wrong[:3])
        raise ValueError(f"the checkpoint's shapes do not fit {described} with "
                         f"{_options_text(name, model)}: {shapes}"
                         + (f" ({len(wrong) - 3} more)" if len(wrong) > 3 else ""))
    different = [key for key, buffer in buffers.items()
                 if buffer.derived and not np.array_equal(state_dict[key], buffer.value)]
    if different:
        raise ValueError(
            f"the checkpoint's {_first(different, 2)} differ from those of {described} "
            f"with {_options_text(name, model)}: it was built for another grid or window")
    flat = {p.path: jnp.asarray(_from_torch(p.path[-1], state_dict[p.key]))
            for p in parameters}
    return model, traverse_util.unflatten_dict(flat)


# The published variants, by the options that tell them apart.
_VARIANTS = (
    ("voxelmorph", "VoxelMorph-1 (VxmDense_1)", dict(enc_features=(8, 32, 32, 32),
                                                    final_features=(32, 8, 8))),
    ("voxelmorph", "VoxelMorph-2 (VxmDense_2)", dict(enc_features=(16, 32, 32, 32),
                                                    final_features=(32, 16, 16))),
    ("vitvnet", "ViT-V-Net", dict(hidden_size=252, num_layers=12)),
    ("transmorph", "TransMorph, the OASIS release's layout (half-resolution flow)",
     dict(embed_dim=96, depths=(2, 2, 4, 2), half_resolution_flow=True)),
    ("transmorph", "TransMorph, the IXI release's layout",
     dict(embed_dim=96, depths=(2, 2, 4, 2), half_resolution_flow=False)),
    ("transmorph", "TransMorph-Large, the OASIS release's layout (half-resolution flow)",
     dict(embed_dim=128, depths=(2, 2, 12, 2), half_resolution_flow=True)),
)


def variant(model: RegistrationNetwork) -> str:
    """Which published network ``model`` is, e.g. ``"VoxelMorph-2 (VxmDense_2)"``;
    otherwise its class name and the options that tell the variants apart."""
    name = next(n for n, cls in NETWORKS.items() if isinstance(model, cls))
    for network, description, values in _VARIANTS:
        if network == name and all(tuple(np.atleast_1d(getattr(model, k))) ==
                                   tuple(np.atleast_1d(v)) for k, v in values.items()):
            return description
    return f"{type(model).__name__} ({_options_text(name, model)})"


def _options_text(name: str, model: RegistrationNetwork) -> str:
    shown = ("window_size", "depths", "num_heads", "embed_dim") if name == "transmorph" \
        else ("enc_features", "dec_features", "final_features") if name == "voxelmorph" \
        else ("hidden_size", "num_layers", "encoder_channels", "decoder_channels")
    return ", ".join(f"{option}={getattr(model, option)!r}" for option in shown)


def to_torch(model: RegistrationNetwork, variables: Mapping[str, Any]
             ) -> "collections.OrderedDict[str, np.ndarray]":
    """The authors' state_dict of ``model`` with ``variables``, as NumPy arrays.

    Every entry that their model's ``load_state_dict(strict=True)`` needs, under
    their names and in their layouts (``torch.from_numpy`` each to load it):
    our variables, the derived buffers (grid, relative position indices),
    BatchNorm's ``num_batches_tracked`` (0) and, for the half-resolution
    TransMorph, the unused ``c2.0.weight`` (zeros).

    Raises:
      ValueError: ``model`` is not one of our networks, or ``variables`` do not
        fit it (the first differing variables named).
    """
    name = next((n for n, cls in NETWORKS.items() if isinstance(model, cls)), None)
    if name is None:
        raise ValueError(f"{type(model).__name__} is not one of the networks with a "
                         f"PyTorch layout ({', '.join(_SIGNATURES)})")
    parameters, buffers = _layout(name, model)
    flat = traverse_util.flatten_dict({k: v for k, v in variables.items()
                                       if k in ("params", "batch_stats")})
    wanted = {p.path: p.shape for p in parameters}
    wrong = sorted("/".join(path) for path in set(flat) ^ set(wanted)) + sorted(
        "/".join(path) for path in set(flat) & set(wanted)
        if tuple(np.shape(flat[path])) != wanted[path])
    if wrong:
        raise ValueError(f"the variables do not fit {name} at img_size "
                         f"{tuple(model.img_size)}: {_first(wrong)}")
    state_dict = collections.OrderedDict(
        (p.key, np.ascontiguousarray(_to_torch(p.path[-1], np.array(flat[p.path],
                                                                      np.float32))))
        for p in parameters)
    state_dict.update((key, buffer.value) for key, buffer in buffers.items())
    return state_dict

