"""Aggregate metrics.json files: per-run and per-variant tables, paired differences, plots.

Runs differ in variant, training-set size (images per class), learning rate and seed. For each
variant and size the learning rate with the best mean final validation accuracy over seeds is
selected (``select_learning_rates``: validation figures only, never test ones); every other output
holds the selected runs only.

Writes into ``--out-dir``: lr_selection.csv (validation accuracy of every swept learning rate, the
selected one flagged), summary.csv (one row per selected run, with its time to
``--target-val-accuracy``), variant_stats.csv (per variant and size over seeds: mean, standard
deviation, 95% t-interval of test accuracy and training time; mean GPU energy), paired_differences.csv (the report's
questions, per size, paired by seed: pretrained - scratch, frozen -
scratch, torch - keras), summary.md (all four tables),
learning_curves.png, per_class_accuracy.png, confusion_matrices.png, data_efficiency.png (test
accuracy against images per class), pretraining_gain.png (pretrained - scratch and frozen - scratch
per size), conclusions.md (the gains in sentences, each with its interval), and summary_facts.json: which
runs, data, input size, epochs, weights and scratch init (``train.scratch_init``) the summary holds, and
which expected runs it lacks (what the Snakemake report's captions say, whatever config the report is
built with).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .config import FRAMEWORKS, INITS, MODELS, SCRATCH_INITS, format_size, loads_weights, run_name, scratch_init
from .fileio import atomic_path, write_text_atomic
from .metrics import MetricsError, load_metrics

# The reference report: A100, 10 epochs, batch 64, SGD, 32->224, test set used as Keras validation.
REFERENCE = {
    "torch-alexnet-scratch": (0.8278, 438.89),
    "keras-alexnet-scratch": (0.7913, 200.03),
    "torch-alexnet-pretrained": (0.8611, 473.11),
    "keras-vgg16-pretrained": (0.8796, 377.25),
}
RUN_COLUMNS = ["variant", "train_size", "lr", "seed", "epochs", "train_images", "images_per_class", "val_accuracy",
               "best_val_accuracy", "test_accuracy", "train_seconds", "energy_joules", "epochs_to_target", "seconds_to_target",
               "images_per_second", "device", "weights", "scratch_init", "data", "reference_test_accuracy",
               "reference_train_seconds"]
# What the learning-rate selection may read: no test figure among them.
SELECTION_COLUMNS = ["variant", "train_size", "lr", "seed", "val_accuracy"]
OUTPUTS = ("summary.csv", "variant_stats.csv", "paired_differences.csv", "summary.md",
           "learning_curves.png", "per_class_accuracy.png", "confusion_matrices.png", "summary_facts.json",
           "lr_selection.csv", "data_efficiency.png", "pretraining_gain.png", "conclusions.md")
CONFIDENCE = 0.95


def train_size_of(metrics: dict) -> str:
    """The run's training-set size as its path and the tables name it: images per class, or ``all``."""
    return format_size(metrics["config"].get("train_size"))


def size_order(size: str) -> float:
    """Sort key of a ``train_size`` label: by images per class, ``all`` last."""
    return float("inf") if size == "all" else float(size)


def _reference(variant: str, train_size: str) -> tuple[float | None, float | None]:
    """The reference's (test accuracy, seconds); it trained on all the data, so none for a subset."""
    return REFERENCE.get(variant, (None, None)) if train_size == "all" else (None, None)


def time_to_accuracy(history: list[dict], target: float | None) -> tuple[int | None, float | None]:
    """The first epoch whose validation accuracy reaches ``target`` and the training seconds up to the
    end of that epoch (the sum of the epochs' ``seconds``); (None, None) if none does or no target."""
    if target is None:
        return None, None
    seconds = 0.0
    for record in history:
        seconds += record["seconds"]
        if record["val_accuracy"] >= target:
            return record["epoch"], seconds
    return None, None


def weights_label(weights: dict) -> str:
    """Which weights a run started from, as the summary names them: the source, the pretraining's classes
    or the file's name, and the first 8 hex digits of the torch file's sha256 (the same for a Keras run
    that started from its port)."""
    source = weights["source"]
    if source == "none":
        return "none"
    digest = weights.get("origin_sha256") or weights["sha256"]
    if source == "pretrain":
        what = f"pretrained here on {', '.join(weights.get('classes') or ['?'])}"
    elif source == "file":
        what = f"file {Path(weights.get('path') or '?').name}"
    else:
        what = source
    return f"{what} (sha256 {digest[:8]})" if digest else what


def summary_row(metrics: dict, target_val_accuracy: float | None = None) -> dict:
    history = metrics["history"]
    images = sum(epoch["images_per_second"] * epoch["seconds"] for epoch in history)
    size = train_size_of(metrics)
    reference = _reference(metrics["variant"], size)
    epochs_to_target, seconds_to_target = time_to_accuracy(history, target_val_accuracy)
    return {
        "variant": metrics["variant"],
        "train_size": size,
        "lr": float(metrics["config"]["lr"]),
        "seed": metrics["seed"],
        "epochs": len(history),
        "train_images": metrics["data"]["train_size"],
        # The x of the data-efficiency plot: "all" at the whole split's count per class.
        "images_per_class": metrics["data"]["train_size"] / len(metrics["test"]["per_class_accuracy"]),
        "val_accuracy": history[-1]["val_accuracy"],
        "best_val_accuracy": max(epoch["val_accuracy"] for epoch in history),
        "test_accuracy": metrics["test"]["accuracy"],
        "train_seconds": metrics["train_seconds"],
        "energy_joules": metrics["energy"]["joules"],  # None (an empty cell) when not measured
        "epochs_to_target": epochs_to_target,
        "seconds_to_target": seconds_to_target,
        "images_per_second": images / metrics["train_seconds"] if metrics["train_seconds"] else 0.0,
        "device": metrics["environment"]["device_name"],
        "weights": weights_label(metrics["weights"]),
        "scratch_init": scratch_init(metrics["init"], metrics["config"]),  # None (empty) unless a scratch run
        "data": metrics["data"]["source"],
        "reference_test_accuracy": reference[0],
        "reference_train_seconds": reference[1],
    }


def _sorted(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    return frame.sort_values(columns, key=lambda c: c.map(size_order) if c.name == "train_size" else c,
                             ignore_index=True)


def summarize(metrics_list: list[dict], target_val_accuracy: float | None = None) -> pd.DataFrame:
    """One row per run (every learning rate)."""
    rows = [summary_row(m, target_val_accuracy) for m in metrics_list]
    frame = pd.DataFrame(rows, columns=RUN_COLUMNS).astype({"epochs_to_target": "Int64"})
    return _sorted(frame, ["variant", "train_size", "lr", "seed"])


def select_learning_rates(sweep: pd.DataFrame) -> pd.DataFrame:
    """Per variant and training-set size, each learning rate's final validation accuracy over seeds
    (mean, sample std, n) and ``selected``: the best mean; on a tie, the smallest learning rate.

    ``sweep`` has the SELECTION_COLUMNS only, so that no test figure can sway the choice.
    """
    rows = []
    for (variant, size), group in sweep[SELECTION_COLUMNS].groupby(["variant", "train_size"], sort=False):
        candidates = []
        for lr, runs in group.groupby("lr", sort=True):
            values = runs["val_accuracy"].to_numpy(dtype=float)
            candidates.append({"variant": variant, "train_size": size, "lr": lr, "seeds": len(values),
                               "val_accuracy_mean": values.mean(),
                               "val_accuracy_std": values.std(ddof=1) if len(values) > 1 else np.nan})
        best = min(candidates, key=lambda row: (-row["val_accuracy_mean"], row["lr"]))
        rows += [{**row, "selected": row is best} for row in candidates]
    columns = ["variant", "train_size", "lr", "seeds", "val_accuracy_mean", "val_accuracy_std", "selected"]
    return _sorted(pd.DataFrame(rows, columns=columns), ["variant", "train_size", "lr"])


def selected_runs(runs: pd.DataFrame, selection: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``runs`` at their variant's and size's selected learning rate."""
    chosen = selection.loc[selection["selected"], ["variant", "train_size", "lr"]]
    return _sorted(runs.merge(chosen, on=["variant", "train_size", "lr"]), ["variant", "train_size", "seed"])


def mean_interval(values) -> dict:
    """Mean, sample standard deviation and two-sided t-interval (NaN where n < 2)."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    n = len(values)
    mean = values.mean()
    std = values.std(ddof=1) if n > 1 else np.nan
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * std / np.sqrt(n) if n > 1 else np.nan
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def variant_stats(runs: pd.DataFrame) -> pd.DataFrame:
    """Per variant and training-set size (at its selected learning rate) over seeds."""
    rows = []
    for (variant, size), group in runs.groupby(["variant", "train_size"], sort=False):
        row = {"variant": variant, "train_size": size, "lr": group["lr"].iloc[0], "seeds": len(group)}
        for column in ("test_accuracy", "train_seconds"):
            stats = mean_interval(group[column])
            row.update({f"{column}_{k}": v for k, v in stats.items() if k != "n"})
        row["energy_joules_mean"] = group["energy_joules"].astype(float).mean(skipna=False)  # NaN unless all measured
        rows.append(row)
    return pd.DataFrame(rows)


def comparisons(variants: set[str]) -> list[tuple[str, str, str]]:
    """(question, minuend, subtrahend) for every pair of configured variants that answers one."""
    pairs = []
    for framework in FRAMEWORKS:
        for model in MODELS:
            for init in INITS:  # what ImageNet weights gain over random ones, fine-tuned or frozen
                if loads_weights(init):
                    pairs.append((f"{init} - scratch ({framework} {model})",
                                  f"{framework}-{model}-{init}", f"{framework}-{model}-scratch"))
    for model in MODELS:
        for init in INITS:
            pairs.append((f"torch - keras ({model} {init})", f"torch-{model}-{init}", f"keras-{model}-{init}"))
    return [pair for pair in pairs if pair[1] in variants and pair[2] in variants]


def device_check(devices_a, devices_b) -> dict:
    """The devices each side of a comparison ran on; ``mixed_devices`` when they differ (then the
    comparison is between machines, not between variants)."""
    a, b = sorted(set(devices_a)), sorted(set(devices_b))
    return {"devices_a": ", ".join(a), "devices_b": ", ".join(b), "mixed_devices": a != b}


def _devices_cell(row) -> str:
    if row.mixed_devices:
        return f"MIXED, not comparable: a on {row.devices_a}, b on {row.devices_b}"
    return row.devices_a


def paired_differences(runs: pd.DataFrame) -> pd.DataFrame:
    """Differences between two variants at the same training-set size over the seeds both ran (paired
    by seed), each at its own selected learning rate."""
    rows = []
    sizes = sorted(set(runs["train_size"]), key=size_order)
    for (question, first, second), size in itertools.product(comparisons(set(runs["variant"])), sizes):
        at_size = runs[runs.train_size == size]
        paired = at_size[at_size.variant == first].merge(at_size[at_size.variant == second], on="seed",
                                                         suffixes=("_a", "_b"))
        if paired.empty:
            continue
        row = {"comparison": question, "train_size": size, "a": first, "b": second, "paired_seeds": len(paired)}
        row.update(device_check(paired["device_a"], paired["device_b"]))
        for column in ("test_accuracy", "train_seconds"):
            stats = mean_interval(paired[f"{column}_a"] - paired[f"{column}_b"])
            row.update({f"{column}_diff_{k}": v for k, v in stats.items() if k != "n"})
        rows.append(row)
    columns = ["comparison", "train_size", "a", "b", "paired_seeds", "devices_a", "devices_b", "mixed_devices"] + [
        f"{c}_diff_{k}" for c in ("test_accuracy", "train_seconds") for k in ("mean", "std", "ci_low", "ci_high")]
    return pd.DataFrame(rows, columns=columns)


def scratch_init_variants(metrics_list: list[dict]) -> dict[str, list[str]]:
    """Each ``scratch_init`` the scratch runs used (in SCRATCH_INITS order) and the variants that used it."""
    used: dict[str, set] = {}
    for metrics in metrics_list:
        rule = scratch_init(metrics["init"], metrics["config"])
        if rule is not None:
            used.setdefault(rule, set()).add(metrics["variant"])
    return {rule: sorted(used[rule]) for rule in SCRATCH_INITS if rule in used}


def summary_facts(metrics_list: list[dict], expected: list[str] | None = None,
                  target_val_accuracy: float | None = None) -> dict:
    """What the summarized runs are, read from their metrics, and the expected runs not among them."""
    runs = sorted(run_name(m["variant"], m["config"].get("train_size"), m["config"]["lr"], m["seed"])
                  for m in metrics_list)
    return {
        "runs": runs,
        "data": sorted({m["data"]["source"] for m in metrics_list}),
        "split": sorted({(m["data"]["train_size"], m["data"]["val_size"], m["data"]["test_size"])
                         for m in metrics_list}),
        "image_size": sorted({m["config"]["image_size"] for m in metrics_list}),
        "epochs": sorted({len(m["history"]) for m in metrics_list}),
        "weights": sorted({weights_label(m["weights"]) for m in metrics_list if loads_weights(m["init"])}),
        "scratch_init": scratch_init_variants(metrics_list),
        "train_sizes": sorted({train_size_of(m) for m in metrics_list}, key=size_order),
        "target_val_accuracy": target_val_accuracy,
        "missing": sorted(set(expected or []) - set(runs)),
    }


def _listing(values) -> str:
    return ", ".join(map(str, values))


SCRATCH_INIT_MEANING = {"torchvision": "torchvision's rules in both frameworks",
                        "framework": "each framework's own defaults: torchvision's in torch, Glorot-uniform "
                                     "kernels and zero biases in Keras"}


def describe_scratch_init(scratch_inits: dict) -> str:
    """Which init (``train.scratch_init``) the scratch variants started from; empty without scratch runs."""
    if not scratch_inits:
        return ""
    rules = "; ".join(f"{rule} ({SCRATCH_INIT_MEANING[rule]}) for {_listing(variants)}"
                      for rule, variants in scratch_inits.items())
    return f" Scratch runs' initialisation (scratch_init): {rules}."


def describe_runs(facts: dict) -> str:
    """One paragraph (plain text that is also valid Markdown and reStructuredText) about the runs."""
    splits = "; ".join(f"{train} train, {val} validation, {test} test images" for train, val, test in facts["split"])
    sizes = _listing(f"{size}x{size}" for size in facts["image_size"])
    weights = _listing(facts["weights"]) if facts["weights"] else "none (no pretrained or frozen variant)"
    return (f"Summarized runs ({len(facts['runs'])}): {_listing(facts['runs'])}. Data: "
            f"{_listing(facts['data'])} ({splits}), input resized to {sizes}; epochs: {_listing(facts['epochs'])}; "
            f"pretrained weights: {weights}." + describe_scratch_init(facts.get("scratch_init", {})))


def describe_missing(missing: list[str], expected: int, unexpected: list[str] = ()) -> str:
    text = ""
    if missing:
        text += (f"Missing: {len(missing)} of the {expected} expected runs have no results here: "
                 f"{_listing(missing)}.")
    if unexpected:
        text += f"{' ' if text else ''}Not in the expected runs: {_listing(unexpected)}."
    return text


def caption_facts(facts_path: str | Path, configured: list[str]) -> dict:
    """The report captions' sentences: the runs in the summary beside the report's configured runs.

    Read when the report is built, so a report whose config asks for other runs than those
    summarized says which are missing instead of describing them.
    """
    path = Path(facts_path)
    if not path.exists():
        return {"about": f"No {path.name} yet: run the workflow (the same command without --report) to summarize the runs.",
                "missing": ""}
    facts = json.loads(path.read_text())
    missing = sorted(set(configured) - set(facts["runs"]))
    unexpected = sorted(set(facts["runs"]) - set(configured))
    return {"about": describe_runs(facts), "missing": describe_missing(missing, len(configured), unexpected)}


def conclusions_text(path: str | Path) -> str:
    """conclusions.md without its title, for the report's caption (read when the report is built)."""
    path = Path(path)
    if not path.exists():
        return f"No {path.name} yet: run the workflow (the same command without --report) to summarize the runs."
    return path.read_text().removeprefix("# Conclusions\n\n")

# Human-facing numbers: every accuracy (and accuracy difference) as a fraction with 4 decimals,
# seconds and rates with 1; "–" where a value does not exist (a single seed's std and interval).
MISSING = "–"


def format_accuracy(value) -> str:
    return MISSING if value is None or pd.isna(value) else f"{value:.4f}"


def format_seconds(value) -> str:
    return MISSING if value is None or pd.isna(value) else f"{value:.1f}"


def _interval(mean, low, high, number=format_accuracy) -> str:
    """``mean [low, high]``; ``mean [–]`` without an interval (one seed)."""
    if pd.isna(low):
        return f"{number(mean)} [{MISSING}]"
    return f"{number(mean)} [{number(low)}, {number(high)}]"


def _energy(joules) -> str:
    return "–" if pd.isna(joules) else f"{joules:.4g}"


# ------------------------------------------------------------------ what pretraining buys, in sentences
GAIN_INITS = {"pretrained": "fine-tuning", "frozen": "the frozen backbone"}
INCLUDES_ZERO = "the interval includes 0: not supported by these seeds"


def pretraining_gains(differences: pd.DataFrame) -> pd.DataFrame:
    """The ``pretrained - scratch`` and ``frozen - scratch`` rows of paired_differences, with their
    ``framework``, ``model`` and ``init``, in table order."""
    parts = differences["comparison"].str.extract(r"^(pretrained|frozen) - scratch \((\w+) (\w+)\)$")
    parts.columns = ["init", "framework", "model"]
    return pd.concat([differences, parts], axis=1).dropna(subset=["init"]).reset_index(drop=True)


def interval_includes_zero(low, high) -> bool:
    return bool(low <= 0 <= high)


def _at_size(size: str) -> str:
    return "on the whole training split" if size == "all" else f"at {size} images per class"


def gain_sentence(row) -> str:
    """One claim about ``row`` (a pretraining_gains row) with its interval, or why there is none."""
    what = _at_size(row.train_size)
    what = what[0].upper() + what[1:]
    interval = _interval(row.test_accuracy_diff_mean, row.test_accuracy_diff_ci_low, row.test_accuracy_diff_ci_high)
    difference = f"{GAIN_INITS[row.init]} minus scratch is {interval}"
    if pd.isna(row.test_accuracy_diff_ci_low):
        return f"{what}, {difference} test accuracy from a single seed: no interval, so no claim."
    seeds = f"test accuracy over {row.paired_seeds} seeds"
    if interval_includes_zero(row.test_accuracy_diff_ci_low, row.test_accuracy_diff_ci_high):
        return f"{what}, {difference} {seeds}; {INCLUDES_ZERO}."
    winner, loser = (GAIN_INITS[row.init], "scratch") if row.test_accuracy_diff_mean > 0 else (
        "scratch", GAIN_INITS[row.init])
    return f"{what}, {difference} {seeds}: {winner} beats {loser}."


def smallest_gain_sentence(rows: pd.DataFrame, init: str) -> str:
    """The smallest training-set size at which ``init``'s gain over scratch has an interval above 0."""
    name = GAIN_INITS[init]
    if rows["test_accuracy_diff_ci_low"].isna().all():
        return f"With a single seed there is no interval for {name}'s gain: run several ``seeds``."
    above = rows[rows["test_accuracy_diff_ci_low"] > 0]
    if above.empty:
        return f"At no training-set size does the interval of {name}'s gain over scratch exclude 0."
    size = min(above["train_size"], key=size_order)
    return f"The smallest training set where {name}'s gain over scratch excludes 0: {_at_size(size)}."


def conclusions(differences: pd.DataFrame) -> str:
    """What pretraining buys per framework and model, in sentences generated from paired_differences:
    each claim with its 95% interval, and where the interval includes 0, says so. Plain text that is
    valid Markdown and reStructuredText (summary.md, conclusions.md and the HTML report hold it)."""
    gains = pretraining_gains(differences)
    text = ("Generated from the paired differences of test accuracy (same seeds, each variant at its selected "
            f"learning rate), as mean [{CONFIDENCE:.0%} t-interval]; a claim whose interval includes 0 is not "
            "supported by these seeds.\n\n")
    if gains.empty:
        return text + ("No scratch variant ran beside a pretrained or frozen one of the same framework and model: "
                       "nothing to conclude about pretraining.\n")
    for (framework, model), group in gains.groupby(["framework", "model"], sort=False):
        text += f"**{framework} {model}**\n\n"
        for init in GAIN_INITS:
            rows = group[group["init"] == init]
            rows = rows.iloc[sorted(range(len(rows)), key=lambda i: size_order(rows["train_size"].iloc[i]))]
            text += "".join(f"- {gain_sentence(row)}\n" for row in rows.itertuples())
            if len(rows):
                text += f"- {smallest_gain_sentence(rows, init)}\n"
        text += "\n"
    return text


def to_markdown(runs: pd.DataFrame, stats: pd.DataFrame, differences: pd.DataFrame, selection: pd.DataFrame,
                facts: dict, expected: int) -> str:
    per_variant = pd.DataFrame({
        "variant": stats["variant"],
        "train size": stats["train_size"],
        "lr": stats["lr"],
        "seeds": stats["seeds"],
        "test acc, mean [95% CI]": [_interval(r.test_accuracy_mean, r.test_accuracy_ci_low, r.test_accuracy_ci_high)
                                    for r in stats.itertuples()],
        "test acc std": stats["test_accuracy_std"].map(format_accuracy),
        "train s, mean [95% CI]": [_interval(r.train_seconds_mean, r.train_seconds_ci_low, r.train_seconds_ci_high,
                                             format_seconds) for r in stats.itertuples()],
        "energy J, mean": stats["energy_joules_mean"].map(_energy),
        "reference test acc": [format_accuracy(_reference(v, size)[0])
                               for v, size in zip(stats["variant"], stats["train_size"])],
        "reference train s": [format_seconds(_reference(v, size)[1])
                              for v, size in zip(stats["variant"], stats["train_size"])],
    })
    paired = pd.DataFrame({
        "comparison": differences["comparison"],
        "train size": differences["train_size"],
        "paired seeds": differences["paired_seeds"],
        "test acc difference [95% CI]": [
            _interval(r.test_accuracy_diff_mean, r.test_accuracy_diff_ci_low, r.test_accuracy_diff_ci_high)
            for r in differences.itertuples()],
        "train s difference [95% CI]": [
            _interval(r.train_seconds_diff_mean, r.train_seconds_diff_ci_low, r.train_seconds_diff_ci_high,
                      format_seconds)
            for r in differences.itertuples()],
        "devices": [_devices_cell(r) for r in differences.itertuples()],
    })
    sweep = selection.assign(selected=selection["selected"].map({True: "yes", False: ""})).rename(columns={
        "train_size": "train size", "val_accuracy_mean": "val acc mean", "val_accuracy_std": "val acc std"})
    target = facts.get("target_val_accuracy")
    shown = runs.drop(columns=["weights", "scratch_init", "data"]).astype({"epochs_to_target": object})
    shown["energy_joules"] = runs["energy_joules"].map(_energy)
    shown["epochs_to_target"] = shown["epochs_to_target"].where(shown["epochs_to_target"].notna(), None)
    shown = shown.rename(columns={
        "train_size": "train size", "train_images": "train images", "images_per_class": "images/class",
        "val_accuracy": "final val acc",
        "epochs_to_target": "epochs to target", "seconds_to_target": "s to target",
        "best_val_accuracy": "best val acc", "test_accuracy": "test acc", "train_seconds": "train s",
        "energy_joules": "energy J",
        "images_per_second": "images/s", "reference_test_accuracy": "reference test acc",
        "reference_train_seconds": "reference train s",
    })
    for column in ("final val acc", "best val acc", "test acc", "reference test acc"):
        shown[column] = shown[column].map(format_accuracy)
    for column in ("train s", "s to target", "images/s", "reference train s"):
        shown[column] = shown[column].map(format_seconds)
    shown["images/class"] = shown["images/class"].map(lambda count: f"{count:g}")
    shown["epochs to target"] = shown["epochs to target"].map(lambda epoch: MISSING if epoch is None else str(epoch))
    for column in ("val acc mean", "val acc std"):
        sweep[column] = sweep[column].map(format_accuracy)
    missing = describe_missing(facts["missing"], expected)
    # Cells are formatted above; tabulate must not reparse them as numbers.
    table = lambda frame: frame.to_markdown(index=False, disable_numparse=True)  # noqa: E731
    return (
        "# Results\n\n"
        + describe_runs(facts) + "\n\n" + (f"**{missing}**\n\n" if missing else "")
        + "Accuracies are fractions of images classified correctly, to 4 decimals. Intervals are two-sided "
        f"{CONFIDENCE:.0%} t-intervals over seeds ({MISSING} with a single seed). Reference: the original report "
        "(A100, 10 epochs, batch 64, one seed; it validated Keras runs on the test set).\n\n"
        "## Per variant\n\n" + table(per_variant) + "\n\n"
        "## Paired differences (same seeds)\n\n"
        + (table(paired) if len(paired) else "No pair of configured variants answers a comparison.") + "\n\n"
        "## Conclusions\n\n" + conclusions(differences) + "\n"
        "## Learning-rate selection (validation)\n\n"
        "Per variant and training-set size (images per class), the final-epoch validation accuracy of "
        "each learning rate over seeds; the selected one has the best mean (on a tie, the smallest "
        "learning rate). Test figures play no part in the choice; the tables above and below hold the "
        "selected runs only.\n\n" + table(sweep) + "\n\n"
        "## Per run\n\n"
        + (f"Time to accuracy: the first epoch whose validation accuracy reached {target:g}, and the "
           "training seconds up to its end (empty: never reached).\n\n" if target is not None else
           "No target_val_accuracy configured: no time to accuracy.\n\n")
        + table(shown) + "\n"
    )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> None:
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    _pyplot().close(fig)


def _by_variant(metrics_list):
    """Runs grouped by variant and, for a subset of the training data, its size (``variant n100``)."""
    grouped: dict[str, list[dict]] = {}
    for metrics in sorted(metrics_list, key=lambda m: (m["variant"], size_order(train_size_of(m)), m["seed"])):
        size = train_size_of(metrics)
        grouped.setdefault(metrics["variant"] + ("" if size == "all" else f" n{size}"), []).append(metrics)
    return grouped


LEARNING_CURVES = (("train_accuracy", "train accuracy"), ("val_accuracy", "validation accuracy"),
                   ("train_loss", "train loss"), ("val_loss", "validation loss"))


def learning_curves_figure(metrics_list: list[dict]):
    """Accuracy (top row) and loss (bottom row) per epoch, train left and validation right: mean over
    seeds, with a +-1 std band. Axes in ``LEARNING_CURVES`` order."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, grid = plt.subplots(2, 2, figsize=(12, 8), sharex=True, sharey="row")
    axes = list(grid.flat)
    for variant, runs in _by_variant(metrics_list).items():
        label = f"{variant} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
        color = None
        for ax, (key, _) in zip(axes, LEARNING_CURVES):
            epochs = min(len(r["history"]) for r in runs)
            values = np.array([[e[key] for e in r["history"][:epochs]] for r in runs])
            x = np.arange(1, epochs + 1)
            line, = ax.plot(x, values.mean(0), marker="o", label=label, color=color)
            color = line.get_color()
            if len(runs) > 1:
                ax.fill_between(x, values.mean(0) - values.std(0, ddof=1), values.mean(0) + values.std(0, ddof=1),
                                color=color, alpha=0.2)
    for ax, (_, title) in zip(axes, LEARNING_CURVES):
        ax.set_title(title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
    for ax in grid[1]:
        ax.set_xlabel("epoch")
        ax.tick_params(labelbottom=True)
    grid[0, 0].set_ylabel("accuracy")
    grid[1, 0].set_ylabel("cross-entropy loss")
    grid[0, 1].legend(fontsize="small", loc="best")
    fig.tight_layout()
    return fig


def plot_learning_curves(metrics_list: list[dict], out: Path) -> None:
    _save(learning_curves_figure(metrics_list), out)


def plot_per_class_accuracy(metrics_list: list[dict], out: Path) -> None:
    """Test accuracy per class and variant: mean over seeds, error bars of one std."""
    plt = _pyplot()
    grouped = _by_variant(metrics_list)
    classes = list(next(iter(grouped.values()))[0]["test"]["per_class_accuracy"])
    fig, ax = plt.subplots(figsize=(max(8, len(classes) * 1.1), 4.5))
    width = 0.8 / len(grouped)
    for index, (variant, runs) in enumerate(grouped.items()):
        values = np.array([[r["test"]["per_class_accuracy"][c] for c in classes] for r in runs])
        errors = values.std(0, ddof=1) if len(runs) > 1 else None
        ax.bar(np.arange(len(classes)) + index * width - 0.4 + width / 2, values.mean(0), width, yerr=errors,
               label=variant, capsize=2)
    ax.set_xticks(np.arange(len(classes)), classes, rotation=30, ha="right")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, out)


def plot_confusion_matrices(metrics_list: list[dict], out: Path) -> None:
    """Row-normalised test confusion matrix per variant, summed over seeds."""
    plt = _pyplot()
    grouped = _by_variant(metrics_list)
    columns = min(4, len(grouped))
    rows = -(-len(grouped) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 4.0 * rows), squeeze=False)
    for ax in axes.flat[len(grouped):]:
        ax.axis("off")
    for ax, (variant, runs) in zip(axes.flat, grouped.items()):
        matrix = np.sum([np.asarray(r["test"]["confusion_matrix"]) for r in runs], axis=0).astype(float)
        matrix /= np.maximum(matrix.sum(1, keepdims=True), 1)
        classes = list(runs[0]["test"]["per_class_accuracy"])
        ax.imshow(matrix, vmin=0, vmax=1, cmap="Blues")
        ax.set_title(f"{variant} ({len(runs)} seed{'s' if len(runs) > 1 else ''})", fontsize="small")
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize="x-small")
        ax.set_yticks(range(len(classes)), classes, fontsize="x-small")
        ax.set_xlabel("predicted", fontsize="small")
        ax.set_ylabel("true", fontsize="small")
    fig.tight_layout()
    _save(fig, out)


def data_efficiency_figure(runs: pd.DataFrame):
    """Test accuracy against training images per class (log x; ``all`` at the whole split's count per
    class), one line per variant at its selected learning rates: the mean over seeds, and a band from
    the lowest to the highest seed where there are several. ``runs``: summary.csv's rows."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    ticks = {}
    for variant, group in runs.groupby("variant", sort=True):
        per_size = sorted(group.groupby("train_size"), key=lambda item: size_order(item[0]))
        x = np.array([sizes["images_per_class"].mean() for _, sizes in per_size])
        accuracy = [sizes["test_accuracy"].to_numpy(dtype=float) for _, sizes in per_size]
        seeds = sorted({len(values) for values in accuracy})
        line, = ax.plot(x, [values.mean() for values in accuracy], marker="o",
                        label=f"{variant} ({'/'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''})")
        if max(seeds) > 1:
            ax.fill_between(x, [values.min() for values in accuracy], [values.max() for values in accuracy],
                            color=line.get_color(), alpha=0.15)
        for (size, _), count in zip(per_size, x):
            ticks[count] = size if size != "all" else f"all ({count:g})"
    ax.set_xscale("log")
    ax.set_xticks(sorted(ticks), [ticks[count] for count in sorted(ticks)])
    ax.minorticks_off()
    ax.set_xlabel("training images per class (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy against training-set size (selected learning rate; band: min to max over seeds)",
                 fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    return fig


def pretraining_gain_figure(differences: pd.DataFrame):
    """Per framework and model (a panel each), ``pretrained - scratch`` and ``frozen - scratch`` test
    accuracy per training-set size: the mean paired difference with its 95% t-interval as error bars
    (none with a single seed). ``differences``: paired_differences.csv's rows."""
    plt = _pyplot()
    gains = pretraining_gains(differences)
    panels = list(dict.fromkeys(zip(gains["framework"], gains["model"])))
    columns = max(1, min(3, len(panels)))
    rows = max(1, -(-len(panels) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no pretrained or frozen variant beside its scratch one", ha="center", va="center")
    sizes = sorted(set(gains["train_size"]), key=size_order)
    for ax, (framework, model) in zip(axes.flat, panels):
        for offset, init in zip((-0.06, 0.06), GAIN_INITS):
            part = gains[(gains.framework == framework) & (gains.model == model) & (gains.init == init)]
            part = part.iloc[sorted(range(len(part)), key=lambda i: size_order(part["train_size"].iloc[i]))]
            if part.empty:
                continue
            mean = part["test_accuracy_diff_mean"].to_numpy(dtype=float)
            errors = [mean - part["test_accuracy_diff_ci_low"].to_numpy(dtype=float),
                      part["test_accuracy_diff_ci_high"].to_numpy(dtype=float) - mean]
            ax.errorbar([sizes.index(size) + offset for size in part["train_size"]], mean, yerr=errors, marker="o",
                        capsize=3, label=f"{init} - scratch")
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_xlabel("training images per class")
        ax.set_title(f"{framework} {model}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0, 0].set_ylabel("test accuracy difference [95% CI]")
    fig.tight_layout()
    return fig


def write_report(metrics_list: list[dict], out_dir: Path, expected: list[str] | None = None,
                 target_val_accuracy: float | None = None) -> pd.DataFrame:
    """Every output; ``expected`` names the runs (``config.run_name``) the summary should hold."""
    all_runs = summarize(metrics_list, target_val_accuracy)
    selection = select_learning_rates(all_runs[SELECTION_COLUMNS])
    runs = selected_runs(all_runs, selection)
    chosen = {(row.variant, row.train_size, row.lr) for row in runs.itertuples()}
    selected_metrics = [m for m in metrics_list
                        if (m["variant"], train_size_of(m), float(m["config"]["lr"])) in chosen]
    stats = variant_stats(runs)
    differences = paired_differences(runs)
    facts = summary_facts(metrics_list, expected, target_val_accuracy)
    for frame, name in ((runs, "summary.csv"), (stats, "variant_stats.csv"), (differences, "paired_differences.csv"),
                        (selection, "lr_selection.csv")):
        with atomic_path(out_dir / name) as tmp:
            frame.to_csv(tmp, index=False)
    write_text_atomic(out_dir / "summary_facts.json", json.dumps(facts, indent=1) + "\n")
    write_text_atomic(out_dir / "summary.md",
                      to_markdown(runs, stats, differences, selection, facts, len(expected or [])))
    plot_learning_curves(selected_metrics, out_dir / "learning_curves.png")
    plot_per_class_accuracy(selected_metrics, out_dir / "per_class_accuracy.png")
    plot_confusion_matrices(selected_metrics, out_dir / "confusion_matrices.png")
    _save(data_efficiency_figure(runs), out_dir / "data_efficiency.png")
    _save(pretraining_gain_figure(differences), out_dir / "pretraining_gain.png")
    write_text_atomic(out_dir / "conclusions.md", "# Conclusions\n\n" + conclusions(differences))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="+", type=Path, help="metrics.json files")
    parser.add_argument("--out-dir", required=True, type=Path, help=f"where to write {', '.join(OUTPUTS)}")
    parser.add_argument("--expected", nargs="*", default=[], metavar="VARIANT/nSIZE-lrLR/seedN",
                        help="the runs the summary should hold; those without a metrics file are named as missing")
    parser.add_argument("--target-val-accuracy", type=float, default=None,
                        help="validation accuracy whose first epoch and training seconds each run reports")
    args = parser.parse_args(argv)
    try:
        metrics_list = [load_metrics(path) for path in args.metrics]
    except (MetricsError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    write_report(metrics_list, args.out_dir, args.expected, args.target_val_accuracy)
    print((args.out_dir / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
