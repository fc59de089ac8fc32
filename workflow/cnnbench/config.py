"""Variant names and per-variant hyperparameters, shared by the Snakefile and the trainers.

A variant is named ``{framework}-{model}-{init}``; a run is a variant at one training-set size
(``train_sizes``: images per class, None for all), one learning rate (``sweep``) and one seed, stored
under ``results/runs/`` + :func:`run_name`. Hyperparameters resolve in three layers: ``train``
(defaults for all) <- ``init_overrides[init]`` <- ``variant_overrides[variant]``; a ``sweep`` of
learning rates for an init replaces the ``lr`` those layers give.

The initialisations: ``scratch`` (random weights by torchvision's rules, or by each framework's own
with ``train.scratch_init: framework``; everything trains), ``pretrained`` (ImageNet
weights, everything trains: fine-tuning) and ``frozen`` (the same ImageNet weights; the model's
backbone, its convolutional feature extractor, is frozen and only the classifier trains).
"""

from __future__ import annotations

import difflib
import itertools
import re
from typing import NamedTuple

FRAMEWORKS = ("torch", "keras")
MODELS = ("alexnet", "vgg16", "resnet50")
INITS = ("scratch", "pretrained", "frozen")
VALID_VARIANTS = tuple("-".join(parts) for parts in itertools.product(FRAMEWORKS, MODELS, INITS))
REFERENCE_VARIANTS = (
    "torch-alexnet-scratch", "keras-alexnet-scratch",
    "torch-alexnet-pretrained", "keras-vgg16-pretrained",
)


class ConfigError(ValueError):
    """A config value that cannot work; the message lists the valid choices."""


class Variant(NamedTuple):
    framework: str
    model: str
    init: str

    @property
    def name(self) -> str:
        return f"{self.framework}-{self.model}-{self.init}"


def loads_weights(init: str) -> bool:
    """Whether an initialisation starts from an ImageNet weights file (the same file for both)."""
    return init in ("pretrained", "frozen")


def freezes_backbone(init: str) -> bool:
    """Whether the backbone stays as loaded: no gradient, no weight decay, inference mode."""
    return init == "frozen"


# ``train.scratch_init``: where a scratch run's random weights come from. torchvision: torchvision's rules
# in both frameworks (the matched comparison); framework: each framework's own defaults, as its users start.
SCRATCH_INITS = ("torchvision", "framework")
DEFAULT_SCRATCH_INIT = "torchvision"  # the schema's default, and what every run did before the key existed


def scratch_init(init: str, hparams: dict) -> str | None:
    """The ``scratch_init`` a run of ``init`` with these hyperparameters uses: None unless it is a scratch
    run (the new layers of a pretrained or frozen run always follow torchvision's rules). A value the
    schema would reject raises ConfigError, whatever the init."""
    value = hparams.get("scratch_init", DEFAULT_SCRATCH_INIT)
    if value not in SCRATCH_INITS:
        raise ConfigError(f"scratch_init is {value!r}; use one of {', '.join(SCRATCH_INITS)}")
    return value if init == "scratch" else None


def parse_variant(name: str) -> Variant:
    if name not in VALID_VARIANTS:
        raise ConfigError(f"unknown variant {name!r}; valid variants are: {', '.join(VALID_VARIANTS)}")
    return Variant(*name.split("-"))


def resolve_hparams(config: dict, variant: str) -> dict:
    """The hyperparameters one variant trains with (a new dict; ``config`` is not modified)."""
    parsed = parse_variant(variant)
    unknown = sorted(set(config.get("variant_overrides", {})) - set(VALID_VARIANTS))
    if unknown:
        raise ConfigError(f"variant_overrides names unknown variant(s) {', '.join(unknown)}; "
                          f"valid variants are: {', '.join(VALID_VARIANTS)}")
    hparams = dict(config["train"])
    hparams.update(config.get("init_overrides", {}).get(parsed.init, {}))
    hparams.update(config.get("variant_overrides", {}).get(variant, {}))
    return hparams


# ----------------------------------------------------- where pretrained and frozen variants start
KERAS_WEIGHTS_SUFFIXES = (".keras",)


def weights_models(config: dict) -> list[str]:
    """The models of the variants that load weights (pretrained or frozen), each once, in config order."""
    variants = [parse_variant(name) for name in config["variants"]]
    return list(dict.fromkeys(v.model for v in variants if loads_weights(v.init)))


def is_keras_weights_file(path: str) -> bool:
    return str(path).endswith(KERAS_WEIGHTS_SUFFIXES)


def check_weights(config: dict) -> None:
    """Raise ConfigError where ``weights: file`` or ``weights: pretrain`` lacks what it needs."""
    source = config["weights"]
    if source == "file":
        files = config.get("weights_files", {})
        missing = [model for model in weights_models(config) if model not in files]
        if missing:
            raise ConfigError(f"weights: file needs a file for {', '.join(missing)} in weights_files, e.g. "
                              f"`weights_files: {{{missing[0]}: results/runs/.../model.pt}}`")
        for variant in map(parse_variant, config["variants"]):
            if variant.framework == "torch" and loads_weights(variant.init) and is_keras_weights_file(
                    files[variant.model]):
                raise ConfigError(f"{variant.name} cannot start from the Keras file {files[variant.model]}: give "
                                  f"weights_files.{variant.model} as a torch state_dict (.pt/.pth); Keras variants "
                                  "then fine-tune from its port, so both start from identical weights")
    if source == "pretrain" and not config.get("pretrain", {}).get("source_classes"):
        raise ConfigError("weights: pretrain needs pretrain.source_classes: the classes (names or indices) to "
                          "pretrain on, e.g. `pretrain: {source_classes: [airplane, automobile, bird, cat, deer]}`")


def pretrain_hparams(config: dict) -> dict:
    """What the in-workflow pretraining trains with: ``train`` <- ``pretrain.train``, on all source images."""
    hparams = {**config["train"], **config.get("pretrain", {}).get("train", {})}
    return {**hparams, "lr": float(hparams["lr"]), "train_size": None}


# --------------------------------------------------------- the runs: sizes, learning rates, seeds
# One layout for every run directory (the Snakefile's RUN_DIR, the report's run names, the tests).
RUN_LAYOUT = "{variant}/n{size}-lr{lr}/seed{seed}"


def format_size(train_size: int | None) -> str:
    """A training-set size (images per class; None = all) as it appears in a run's path."""
    return "all" if train_size is None else str(int(train_size))


def parse_size(text: str) -> int | None:
    return None if text == "all" else int(text)


def format_lr(lr: float) -> str:
    """A learning rate as it appears in a run's path: Python's shortest round-trip repr of the float
    (``float(format_lr(x)) == x``), only digits, ``.``, ``e``, ``+`` and ``-``."""
    return repr(float(lr))


def run_name(variant: str, train_size: int | None, lr: float, seed: int) -> str:
    """A run's directory under ``results/runs/``: ``{variant}/n{size|all}-lr{lr}/seed{seed}``."""
    return RUN_LAYOUT.format(variant=variant, size=format_size(train_size), lr=format_lr(lr), seed=seed)


def learning_rates(config: dict, variant: str) -> list[float]:
    """The learning rates a variant trains with: its init's ``sweep`` or else its one resolved lr."""
    init = parse_variant(variant).init
    swept = config.get("sweep", {}).get(init, {}).get("lr")
    if not swept:
        return [float(resolve_hparams(config, variant)["lr"])]
    if "lr" in config.get("variant_overrides", {}).get(variant, {}):
        raise ConfigError(f"variant_overrides.{variant}.lr and sweep.{init}.lr both set the learning rate of "
                          f"{variant}: remove one of them")
    return [float(lr) for lr in swept]


def run_hparams(config: dict, variant: str, train_size: int | None, lr: float) -> dict:
    """What one run trains with: the variant's hyperparameters at this lr, plus its training-set size
    (images per class, None = all; the trainer takes the subset and scales the epochs, see
    ``training.training_budget``). ``scratch_init`` is left out of a run that loads weights: it does not
    apply there, and a change of it must not rerun such runs (Snakemake reruns a job whose params change)."""
    hparams = {**resolve_hparams(config, variant), "lr": float(lr), "train_size": train_size}
    if loads_weights(parse_variant(variant).init):
        hparams.pop("scratch_init", None)
    return hparams


def configured_runs(config: dict) -> list[tuple[str, int | None, float, int]]:
    """(variant, train_size, lr, seed) of every run the config asks for."""
    return [(variant, size, lr, seed) for variant in config["variants"]
            for size in config.get("train_sizes", [None])
            for lr in learning_rates(config, variant) for seed in config["seeds"]]


# The files each framework's training rule makes in a run directory (its outputs and its log).
TRAINING_FILES = {"torch": ("metrics.json", "model.pt", "train.log"),
                  "keras": ("metrics.json", "model.keras", "train.log")}
# RUN_LAYOUT's fields in a path under results/runs/, loosely: a misspelled variant or size still parses.
RUN_PATH = re.compile(r"results/runs/(?P<variant>[^/]+)/n(?P<size>[^/]*?)-lr(?P<lr>[^/]*)/seed(?P<seed>[^/]*)"
                      r"/(?P<file>[^/]+)")


def _listed(values) -> str:
    return f"[{', '.join(map(str, values))}]"


def run_problem(config: dict, variant: str, size: str, lr: str, seed: str) -> str | None:
    """Why the run written ``results/runs/{variant}/n{size}-lr{lr}/seed{seed}`` is not one ``config`` asks
    for, and how to add it; None if it is one. The size, lr and seed are compared as paths write them."""
    run = f"results/runs/{RUN_LAYOUT.format(variant=variant, size=size, lr=lr, seed=seed)}"
    variants = list(config["variants"])
    if variant not in VALID_VARIANTS:
        close = difflib.get_close_matches(variant, VALID_VARIANTS, n=1)
        return (f"{run} is not a run of this config: {variant} is not a variant"
                f"{f' (did you mean {close[0]}?)' if close else ''}. This config's variants are "
                f"{', '.join(variants)}; every valid one: {', '.join(VALID_VARIANTS)}")
    problems, additions = [], []
    if variant not in variants:
        problems.append(f"{variant} is not one of its variants ({', '.join(variants)})")
        additions.append(f"variants={_listed([*variants, variant])}")
    sizes = [format_size(s) for s in config.get("train_sizes", [None])]
    rates = [format_lr(rate) for rate in learning_rates(config, variant)]
    if size not in sizes or lr not in rates:
        problems.append(f"its sizes are n{', n'.join(sizes)} (train_sizes) and {variant}'s learning rates "
                        f"lr{', lr'.join(rates)} (sweep, or train/init_overrides/variant_overrides)")
    seeds = [str(s) for s in config["seeds"]]
    if seed not in seeds:
        problems.append(f"its seeds are {', '.join(seeds)} (seeds)")
        additions.append(f"seeds={_listed([*seeds, seed])}" if seed.isdigit() and seed == str(int(seed))
                         else "seeds=[...] (whole numbers, written without leading zeros)")
    if not problems:
        return None
    how = (f". To train it, add it to the config, e.g. `snakemake --cores all {run}/metrics.json --config "
           f"{' '.join(repr(a) for a in additions)}` (--config last: it takes every argument after it), or the same "
           "in your config file" if additions else "")
    return f"{run} is not a run of this config: {'; '.join(problems)}{how}"


def run_target_problem(config: dict, path: str) -> str | None:
    """Why ``path`` (relative to the working directory) under results/runs/ is no file a training of
    ``config`` writes; None if it is one."""
    found = RUN_PATH.fullmatch(path)
    if found is None:
        return (f"{path} is no file the workflow makes: a run's are "
                f"results/runs/{RUN_LAYOUT}/metrics.json (and model.pt or model.keras, train.log), e.g. "
                f"results/runs/{run_name(*configured_runs(config)[0])}/metrics.json")
    problem = run_problem(config, *found.group("variant", "size", "lr", "seed"))
    if problem:
        return problem
    files = TRAINING_FILES[parse_variant(found["variant"]).framework]
    if found["file"] not in files:
        return f"{path} is no file the workflow makes: a {found['variant']} run makes {', '.join(files)}"
    return None


# ------------------------------------------------------------ the config against its schema
def _node(schema: dict, root: dict) -> dict:
    """``schema`` with its ``$ref`` and ``allOf`` parts merged in (properties, type, items)."""
    merged: dict = {}
    parts = [schema]
    while parts:
        part = parts.pop()
        if "$ref" in part:
            parts.append(_resolve_ref(part["$ref"], root))
        parts.extend(part.get("allOf", []))
        for key, value in part.items():
            if key == "properties":
                properties = merged.setdefault("properties", {})
                for name, sub in value.items():
                    properties[name] = {"allOf": [properties[name], sub]} if name in properties else sub
            elif key not in ("$ref", "allOf"):
                merged.setdefault(key, value)
    return merged


def _resolve_ref(ref: str, root: dict) -> dict:
    node = root
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def _child(node: dict, key: str, root: dict) -> dict | None:
    """The schema of ``key`` inside an object ``node``; None for a key the schema does not allow."""
    if key in node.get("properties", {}):
        return _node(node["properties"][key], root)
    extra = node.get("additionalProperties", True)
    if extra is False:
        return None
    return _node(extra, root) if isinstance(extra, dict) else {}


def _types(node: dict) -> set:
    declared = node.get("type", [])
    return {declared} if isinstance(declared, str) else set(declared)


def coerce_command_line(values, schema: dict, root: dict | None = None):
    """``--config`` values typed as the schema wants them.

    Snakemake parses a nested ``--config`` value (``train={epochs: 3}``, ``seeds=[0,1]``) with YAML's
    BaseLoader, which leaves every scalar a string. Each string where the schema does not accept one
    is parsed again as YAML (``'3'`` -> 3, ``'null'`` -> None); strings the schema wants (``compile:
    on``) stay strings, except one its ``enum`` does not list whose YAML value it does (``require_gpu:
    true`` -> True). A value that still has the wrong type is left for the schema to reject.
    """
    root = schema if root is None else root
    node = _node(schema, root)
    if isinstance(values, dict):
        coerced = {}
        for key, value in values.items():
            child = _child(node, key, root)
            coerced[key] = value if child is None else coerce_command_line(value, child, root)
        return coerced
    if isinstance(values, list):
        items = _node(node.get("items", {}), root)
        return [coerce_command_line(value, items, root) for value in values]
    if isinstance(values, str) and _types(node) and "string" not in _types(node):
        return _parse_yaml(values)
    if isinstance(values, str) and values not in node.get("enum", [values]):
        parsed = _parse_yaml(values)  # `require_gpu: true`: the boolean its enum lists, not the string
        if any(type(parsed) is type(choice) and parsed == choice for choice in node["enum"]):
            return parsed
    return values


def _parse_yaml(value: str):
    import yaml  # only the Snakefile calls this; the trainers' images need no YAML

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def check_known_keys(config: dict, schema: dict) -> None:
    """Raise ConfigError naming the valid keys for the first key the schema does not know."""
    _check_keys(config, _node(schema, schema), schema, path=())


def _check_keys(values, node: dict, root: dict, path: tuple) -> None:
    if not (isinstance(values, dict) and ("properties" in node or "additionalProperties" in node)):
        return
    for key, value in values.items():
        child = _child(node, key, root)
        if child is None:
            raise ConfigError(_unknown_key_message(key, node, root, path))
        _check_keys(value, child, root, (*path, key))


def _unknown_key_message(key: str, node: dict, root: dict, path: tuple) -> str:
    where = f"in `{'.'.join(path)}`" if path else "at the top level"
    message = (f"unknown config key `{'.'.join((*path, key))}`; the valid keys {where} are: "
               f"{', '.join(sorted(node.get('properties', {})))}")
    nested = [".".join(found) for found in sorted(_paths_of_key(key, _node(root, root), root, ()), key=len)]
    if nested:
        message += f" (did you mean {' or '.join(f'`{p}`' for p in nested)}?)"
    return message


def _paths_of_key(key: str, node: dict, root: dict, path: tuple, depth: int = 3):
    """Where a key of that name is valid, for a hint (`epochs` -> `train.epochs`)."""
    for name, child in node.get("properties", {}).items():
        if name == key and path:
            yield (*path, name)
        if depth > 1:
            yield from _paths_of_key(key, _node(child, root), root, (*path, name), depth - 1)
