"""Training configs: loading with overrides, the network's options, validation.

A config is an ``ml_collections.ConfigDict`` from a ``get_config()`` file: one
of the configs shipped with the package (``ofg_jax.configs``, the repository's
``configs/`` folder), named by its file name (``"ixi"``), or any file given by
its path. Every default lives in those files, except the network options,
whose defaults are the network's own (the published architecture) and are
filled into ``config.model`` for the chosen ``model.name`` when a config is
loaded. The command line (``python -m ofg_jax.main``) and the experiments
(``--set``) load configs through :func:`load`, so both accept the same keys
with the same rules.
"""

import copy
import dataclasses
import json
import os
import pathlib
import re
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from absl import flags
import ml_collections
from ml_collections import config_dict
from ml_collections import config_flags

from ofg_jax.options import SIMILARITIES

# The networks, datasets and losses (JAX) are imported by the functions that need
# them: a command line imports this module (ConfigError) before it imports JAX.
if TYPE_CHECKING:
    from ofg_jax import models
    from ofg_jax.settings.inner_optimizer import RefineSettings
    from ofg_jax.settings.losses import Intensity

# The configs shipped with the package (``ofg_jax/configs`` is the repository's
# ``configs/`` folder).
CONFIG_FOLDER = pathlib.Path(__file__).resolve().parent.parent / "configs"
DEMO_CONFIG = CONFIG_FOLDER / "demo.py"


def shipped_configs() -> tuple[str, ...]:
    """The names of the configs shipped with the package: ``("abdomen_ct", "demo", ...)``
    (not ``default``, the reference settings that each of them starts from)."""
    return tuple(sorted(path.stem for path in CONFIG_FOLDER.glob("*.py")
                        if path.stem not in ("__init__", "default")))


def config_path(config: Optional[str]) -> str:
    """The file of ``--config``: a path as given, or the shipped config of that name.

    ``"ixi"`` names ``ofg_jax/configs/ixi.py`` (from any folder); anything else is
    taken as a path (``"configs/ixi.py"`` from the repository root). A
    ``:argument`` suffix is kept. None is the demo.

    Raises:
      ConfigError: neither an existing file nor a shipped config's name.
    """
    if not config:
        return str(DEMO_CONFIG)
    path, colon, argument = config.partition(":")
    if os.path.isfile(path):
        return config
    if path in shipped_configs():
        return str(CONFIG_FOLDER / f"{path}.py") + colon + argument
    raise ConfigError(f"config file {path!r} not found (a path to a Python file with "
                      f"get_config(), or one of the shipped configs: "
                      f"{', '.join(shipped_configs())})")


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names it."""


_OVERRIDE = re.compile(r"^--?config\.")


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv`` without its ``--config.<key>=<value>`` arguments, and those
    arguments as the ``key=value`` overrides of :func:`load`."""
    overrides = [arg for arg in argv if _OVERRIDE.match(arg)]
    return ([arg for arg in argv if arg not in overrides],
            [_OVERRIDE.sub("", arg) for arg in overrides])


def load(config_file: Optional[str] = None,
         overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config of ``config_file`` (default: the demo) with ``overrides`` applied.

    Args:
      config_file: a Python file with ``get_config()``, or the name of a shipped
        config (:func:`config_path`); ``path:arg`` passes ``arg`` to it. Config
        files import their shared defaults as ``ofg_jax.configs.default``.
      overrides: ``"key=value"`` strings, as on the command line after
        ``--config.``: ``"train.epochs=3"``, ``"data.img_size=(32,32,32)"``. A
        value is parsed by the type of the field it replaces. The options of the
        network chosen by ``model.name`` are keys of ``model`` too. With
        ``train.init_from`` the network (``model.*``) is by default that
        workdir's (its ``config.json``); ``model.*`` overrides still apply.

    Raises:
      ConfigError: a missing or broken config file (or an unknown name), an
        unknown key (named, with the valid ones where they are few), or a value
        that does not parse.
    """
    config_file = config_path(config_file)
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} must have the form key=value")
    names = [o.split("=", 1)[1] for o in overrides if o.startswith("model.name=")]
    model_options = [o for o in overrides
                     if o.startswith("model.") and not o.startswith("model.name=")]
    others = [o for o in overrides if not o.startswith("model.")]
    argv = ["ofg_jax", f"--config={config_file}"] + [f"--config.{o}" for o in others]
    config = _parse(lambda fv: config_flags.DEFINE_config_file(
        "config", None, flag_values=fv, sys_argv=argv), argv, others, config_file)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"config file {config_file.split(':', 1)[0]!r}: get_config() "
                          "must return an ml_collections.ConfigDict, got "
                          f"{type(config).__name__}")
    start = _model_of_workdir(config.train.get("init_from"))
    if start:  # the network to start from, with all its options
        config = with_overrides(config, {f"model.{key}": value
                                         for key, value in start.items()})
    if names:
        config = with_overrides(config, {"model.name": names[-1]})
    else:
        fill_model_options(config)
    if model_options:
        argv = ["ofg_jax"] + [f"--config.{o}" for o in model_options]
        define = lambda fv: config_flags.DEFINE_config_dict(
            "config", config, flag_values=fv, sys_argv=argv)
        try:
            config = _parse(define, argv, model_options, config_file)
        except ConfigError as e:
            if not str(e).startswith("unknown config key"):
                raise
            valid = ", ".join(sorted(k for k in config.model if k != "name"))
            raise ConfigError(f"{e}; the options of model {config.model.name!r} are: "
                              f"{valid}") from None
    return config


def _model_of_workdir(workdir: Optional[str]) -> Optional[dict[str, Any]]:
    """The ``model`` section of ``workdir/config.json`` (``train.init_from``), or
    None where there is none (the run's check then names what is missing)."""
    path = os.path.join(workdir, "config.json") if workdir else None
    if not path or not os.path.isfile(path):
        return None
    try:
        model = read_record(path).get("model")
    except (OSError, ValueError) as e:
        raise ConfigError(f"train.init_from={workdir}: {e}") from None
    return _tuples(model) if isinstance(model, dict) else None


def _parse(define: Callable[[flags.FlagValues], Any], argv: Sequence[str],
           overrides: Sequence[str], config_file: str) -> ml_collections.ConfigDict:
    """Defines the config flag on fresh flags (``define(fv)``) and parses ``argv``
    into it; config errors as :class:`ConfigError`."""
    try:
        fv = flags.FlagValues()
        define(fv)
        fv(list(argv))
        config = fv["config"].value
        if not isinstance(config, ml_collections.ConfigDict):
            config.lock()  # A config that failed to load raises its error here.
    except (AttributeError, KeyError) as e:  # ml_collections: no such field.
        raise ConfigError(_unknown_key_message(overrides, e)) from None
    except flags.Error as e:
        text = str(e)
        if "Error whilst parsing config file" in text:  # get_config() raised.
            reason = [line for line in text.splitlines() if line.strip()][-1]
            raise ConfigError(f"cannot load config {config_file!r}: {reason.strip()}"
                              ) from None
        raise ConfigError(" ".join(text.split())) from None
    except Exception as e:  # pylint: disable=broad-except
        # The config file's own error (a syntax error, a failing get_config()).
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise ConfigError(f"cannot load config {config_file!r}: "
                          f"{type(e).__name__}: {reason}") from None
    return config


def _unknown_key_message(overrides: Sequence[str], error: Exception) -> str:
    # ml_collections names only the missing field ("'trian'"), sometimes with a
    # suggestion; point at the override that holds it.
    text = str(error).replace("\\n", " ").replace("\\'", "'")
    field = re.search(r"'(\w+)'", text)
    keys = [o.split("=", 1)[0] for o in overrides]
    culprits = [k for k in keys if field and field.group(1) in k.split(".")] or keys
    hint = re.search(r'Did you mean "(\w+)"', text)
    return (f"unknown config key in {', '.join('--config.' + k for k in culprits)}"
            + (f' (did you mean "{hint.group(1)}"?)' if hint else
               "; see the config file for the available keys"))


def fill_model_options(config: ml_collections.ConfigDict, drop_others: bool = False
                       ) -> None:
    """Adds the options of ``model.name`` that ``config.model`` lacks, with defaults:
    the dataset's (``config.model_defaults[model.name]``), else the network's.

    With ``drop_others``, keys that are not options of ``model.name`` (those of
    another network, when the command line switches networks) are removed. An
    unknown ``model.name`` is left for :func:`validate` to report.
    """
    from ofg_jax import models  # pylint: disable=g-import-not-at-top
    try:
        options = models.options(config.model.name)
    except ValueError:
        return
    dataset_defaults = config.get("model_defaults") or {}
    options.update(dataset_defaults.get(config.model.name) or {})
    with config.unlocked():
        if drop_others:
            for key in [k for k in config.model if k != "name" and k not in options]:
                del config.model[key]
        for key, default in options.items():
            if key not in config.model:
                # A None default (dtype) takes any value given later.
                config.model[key] = (config_dict.placeholder(object) if default is None
                                     else default)


def complete(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` with the options of ``model.name`` filled in (what a
    run records in ``config.json``)."""
    config = copy.deepcopy(config)
    fill_model_options(config)
    return config


def with_overrides(config: ml_collections.ConfigDict,
                   overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of ``config`` with Python values set at dotted keys.

    ``model.name`` is set first; switching networks replaces the model options by
    the new network's defaults. Lists become tuples; ints given for float fields
    become floats.

    Raises:
      ConfigError: an unknown key or a value of the wrong type, named.
    """
    config = copy.deepcopy(config)
    overrides = dict(overrides)
    if "model.name" in overrides:
        name = overrides.pop("model.name")
        with config.unlocked():
            switched = name != config.model.get("name")
            config.model.name = name
        fill_model_options(config, drop_others=switched)
    for key, value in overrides.items():
        *parents, field = key.split(".")
        node = config
        for parent in parents:
            if not isinstance(node, ml_collections.ConfigDict) or parent not in node:
                raise ConfigError(f"unknown config key {key!r}")
            node = node[parent]
        if not isinstance(node, ml_collections.ConfigDict) or field not in node:
            raise ConfigError(f"unknown config key {key!r}")
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(node[field], float) and isinstance(value, int):
            value = float(value)
        try:
            with node.unlocked():
                node[field] = value
        except TypeError as e:
            raise ConfigError(f"config key {key!r}: {e}") from None
    return config


def from_json(path: str) -> ml_collections.ConfigDict:
    """The config a run saved as ``config.json`` (lists back to tuples)."""
    content = read_record(path)
    content.pop(HISTORY, None)
    return ml_collections.ConfigDict(_tuples(content))


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The training config saved in ``workdir/config.json``.

    Raises:
      FileNotFoundError: naming the missing workdir or file.
    """
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} not found")
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: {workdir} is not a training workdir "
            "(python -m ofg_jax.main --workdir=... writes config.json)")
    return from_json(path)


def read_record(path: str) -> dict[str, Any]:
    """The JSON content of a run's ``config.json``, history included.

    Raises:
      ValueError: naming the file, if it is not a JSON object.
    """
    try:
        with open(path) as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); it is a run's record, "
                         "written by python -m ofg_jax.main") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path} does not hold a config (a JSON object)")
    return content


def _tuples(value):
    if isinstance(value, dict):
        return {key: _tuples(v) for key, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


# The key of config.json that lists the changes accepted when a run resumed.
HISTORY = "history"
# Keys that only affect logging, evaluation cadence and where a run stops: a
# resumed run may change them freely.
FREE_KEYS = ("train.log_every", "train.figures", "train.eval_every_epochs",
             "train.max_steps", "checkpoint.every_steps", "checkpoint.keep_best")
# Keys a resumed run may change with --allow_config_change, where continuing is
# meaningful: more (or fewer) epochs, moved data, another validation subset.
CHANGEABLE_KEYS = ("train.epochs", "data.root", "data.num_val")


def record(config: ml_collections.ConfigDict, img_size: Sequence[int]) -> dict[str, Any]:
    """The run's record: ``config`` as JSON, with the grid read from the data as
    ``data.img_size``."""
    resolved = json.loads(config.to_json_best_effort())
    resolved["data"]["img_size"] = list(img_size)
    return resolved


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changes(recorded: Mapping[str, Any], new: Mapping[str, Any]
            ) -> dict[str, tuple[Any, Any]]:
    """``{key: (recorded value, new value)}`` of two records where they differ.

    Keys the recorded run did not have (it predates them) are not compared.
    """
    old = _flatten({k: v for k, v in recorded.items() if k != HISTORY})
    now = _flatten({k: v for k, v in new.items() if k != HISTORY})
    return {key: (old[key], now.get(key)) for key in sorted(old)
            if json.dumps(old[key]) != json.dumps(now.get(key))}


def check_resume(recorded: Mapping[str, Any], new: Mapping[str, Any], workdir: str,
                 allow_change: bool) -> dict[str, tuple[Any, Any]]:
    """The differences of a resumed run's config from its record, if allowed.

    Raises:
      ConfigError: one line naming every key that changes the run's meaning
        (model, data, train, ofg, seed) with both values, and how to proceed.
    """
    diff = changes(recorded, new)
    refused = {k: v for k, v in diff.items() if k not in FREE_KEYS
               and not (allow_change and k in CHANGEABLE_KEYS)}
    if refused:
        listed = "; ".join(f"{key}: {old!r} in the run, {now!r} now"
                           for key, (old, now) in refused.items())
        changeable = [k for k in refused if k in CHANGEABLE_KEYS]
        hint = (f", or pass --allow_config_change to continue with the new "
                f"{', '.join(changeable)}" if len(changeable) == len(refused) else "")
        raise ConfigError(
            f"the run in {workdir} was trained with another config ({listed}); "
            f"use another --workdir, or the recorded values{hint}")
    return diff


def model_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Keyword arguments for ``models.create``: every ``model.*`` key but ``name``."""
    return {key: _tuples(value) if isinstance(value, list) else value
            for key, value in config.model.items() if key != "name"}


def build_model(config: ml_collections.ConfigDict,
                img_size: Sequence[int]) -> "models.RegistrationNetwork":
    """``models.create(model.name, img_size, **model_options(config))``.

    Raises:
      ConfigError: the network's options cannot take the grid (named constraint).
    """
    from ofg_jax import models  # pylint: disable=g-import-not-at-top
    try:
        return models.create(config.model.name, img_size, **model_options(config))
    except ValueError as e:
        raise ConfigError(f"model {config.model.name!r} on the grid "
                          f"{tuple(img_size)}: {e}") from None


def reg_weight(config: ml_collections.ConfigDict) -> float:
    """The Grad weight of the model loss: ``train.reg_weight``, or the mode's
    reference value from ``train.reference_reg_weight``."""
    if config.train.reg_weight is None:
        return float(config.train.reference_reg_weight[config.train.mode])
    return float(config.train.reg_weight)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigError` naming the first invalid setting.

    Checks every enumerated key (mode, similarities, the inner optimiser, the
    network and the dataset names, network options) and every count and rate,
    from the config alone: nothing is read or written.
    """
    try:
        _validate(config)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A config resolved once (:func:`resolve`): complete, valid, and what a
    training run reads from it, so that the loop and the step need nothing more
    from this module.

    Attributes:
      config: the complete config (the model options filled in), as
        ``config.json`` records it.
      model_options: keyword arguments of ``models.create`` (:func:`model_options`).
      reg_weight: the Grad weight of the model loss (:func:`reg_weight`).
      refine: the inner optimiser's settings (``config.ofg``).
      intensity: the images OFG's targets are computed from (``config.ofg``).
    """
    config: ml_collections.ConfigDict
    model_options: dict[str, Any]
    reg_weight: float
    refine: "RefineSettings"
    intensity: "Intensity"

    def build_model(self, img_size: Sequence[int]) -> "models.RegistrationNetwork":
        """The network on ``img_size`` (:func:`build_model`)."""
        return build_model(self.config, img_size)


def resolve(config: ml_collections.ConfigDict) -> Resolved:
    """Completes and validates ``config`` and turns it into what training needs.

    Raises:
      ConfigError: the first invalid setting, named (:func:`validate`).
    """
    # pylint: disable=g-import-not-at-top
    from ofg_jax.settings.inner_optimizer import RefineSettings
    from ofg_jax.settings.losses import Intensity
    config = complete(config)
    validate(config)
    return Resolved(config=config, model_options=model_options(config),
                    reg_weight=reg_weight(config),
                    refine=RefineSettings.from_config(config.ofg),
                    intensity=Intensity.from_config(config.ofg))


def _validate(config: ml_collections.ConfigDict) -> None:
    # pylint: disable=g-import-not-at-top
    from ofg_jax import data as data_lib
    from ofg_jax import models
    from ofg_jax.settings.losses import MODES
    from ofg_jax.settings.losses import Intensity
    from ofg_jax.settings.inner_optimizer import RefineSettings
    train = config.train

    def check(ok, key, value, expected):
        if not ok:
            raise ConfigError(f"invalid config: {key}={value!r}; expected {expected}")

    check(train.mode in MODES, "train.mode", train.mode, f"one of {MODES}")
    check(train.similarity in SIMILARITIES, "train.similarity", train.similarity,
          f"one of {SIMILARITIES}")
    for key, value in [("train.epochs", train.epochs),
                       ("train.batch_size", train.batch_size),
                       ("train.log_every", train.log_every)]:
        check(isinstance(value, int) and value >= 1, key, value, "an integer >= 1")
    for key, value in [("train.max_steps", train.max_steps),
                       ("train.eval_every_epochs", train.eval_every_epochs),
                       ("checkpoint.keep_best", config.checkpoint.keep_best),
                       ("checkpoint.every_steps", config.checkpoint.every_steps)]:
        check(isinstance(value, int) and value >= 0, key, value, "an integer >= 0")
    # NaN passes (NaN < 0 is False): the run then stops at the first non-finite
    # update, with the same message as any other divergence.
    for key, value in [("train.learning_rate", train.learning_rate),
                       ("train.weight_decay", train.weight_decay)]:
        check(not value < 0, key, value, "a number >= 0")
    if train.reg_weight is not None:
        check(not train.reg_weight < 0, "train.reg_weight", train.reg_weight,
              "a number >= 0 or None")
    RefineSettings.from_config(config.ofg).validate()
    Intensity.from_config(config.ofg).validate()
    name = config.model.get("name")
    check(name in models.NAMES, "model.name", name, f"one of {models.NAMES}")
    unknown = sorted(set(config.model) - {"name"} - set(models.options(name)))
    if unknown:
        raise ConfigError(f"invalid config: model.{unknown[0]} is not an option of "
                         f"{name}; valid: {', '.join(sorted(models.options(name)))}")
    check(config.data.get("name") in data_lib.NAMES, "data.name",
          config.data.get("name"), f"one of {data_lib.NAMES}")
