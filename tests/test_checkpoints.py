"""A checkpoint is resumed only with the very weights file it was trained from.

The checkpoint is produced without a race: a one-epoch training whose metrics file cannot be
written (its directory is a regular file) stops after the epoch's checkpoint and before the
metrics, which is where a job killed at that moment would leave it.
"""

from __future__ import annotations

import json
import shutil

import pytest

from cnnbench.fileio import file_digest
from conftest import run_python
from test_trainers import train

WEIGHTS = {"torch": ("alexnet-owt-7be5be79.pth", "torch"), "keras": ("alexnet.keras.npz", "keras")}

STANDIN_PAIR = """
import json
from pathlib import Path
from cnnbench.torch_models import port_to_keras, write_standin_weights
out = Path({out!r})
for name, seed in (("a", 0), ("b", 1)):
    write_standin_weights("alexnet", out / f"{{name}}.pth", seed=seed)
    port_to_keras("alexnet", out / f"{{name}}.pth", out / f"{{name}}.keras.npz")
print(json.dumps({{}}))
"""


@pytest.fixture(scope="module")
def weights_pair(tmp_path_factory):
    """Two different stand-in AlexNet weights files per framework: {"torch": (a, b), "keras": (a, b)}."""
    out = tmp_path_factory.mktemp("weights")
    run_python(STANDIN_PAIR.format(out=str(out)))
    return {"torch": (out / "a.pth", out / "b.pth"), "keras": (out / "a.keras.npz", out / "b.keras.npz")}


def pretrained(framework, data, run_dir, weights, check=True):
    return train(framework, f"{framework}-alexnet-pretrained", data, run_dir, check=check,
                 extra=("--weights", weights, "--weights-source", "standin"))


def checkpoint_of_one_epoch(framework, data, run_dir, weights):
    """Train one epoch with ``weights``; keep its checkpoint by failing to write the metrics."""
    run_dir.mkdir()
    blocked = run_dir / "blocked"
    blocked.write_text("a file where the metrics' directory should be")
    result = train(framework, f"{framework}-alexnet-pretrained", data, run_dir, check=False,
                   extra=("--weights", weights, "--weights-source", "standin",
                          "--metrics", blocked / "metrics.json"))  # the later --metrics wins
    assert result.returncode != 0 and "epoch 1/1:" in result.stderr, result.stderr
    assert (run_dir / "checkpoint").is_dir(), result.stderr
    blocked.unlink()
    return run_dir / "checkpoint"


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_checkpoint_resumes_only_with_the_same_weights_file(framework, weights_pair, tiny_dataset, tmp_path):
    original, other = weights_pair[framework]
    name = WEIGHTS[framework][0]
    weights = tmp_path / "weights" / name
    weights.parent.mkdir()
    shutil.copy(original, weights)
    made = checkpoint_of_one_epoch(framework, tiny_dataset, tmp_path / "made", weights)

    def rerun(case, weights_file):
        run_dir = tmp_path / case
        shutil.copytree(made, run_dir / "checkpoint")
        result = pretrained(framework, tiny_dataset, run_dir, weights_file)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["weights"]["sha256"] == file_digest(weights_file)
        assert len(metrics["history"]) == 1
        return result.stderr

    same = rerun("same-file", weights)
    assert "resuming from" in same and "after epoch 1" in same and "epoch 1/1:" not in same, same

    shutil.copy(other, weights)  # new bytes under the same name, e.g. a replaced download
    replaced = rerun("same-name-other-bytes", weights)
    assert "ignoring checkpoint" in replaced and "epoch 1/1:" in replaced, replaced

    switched = rerun("other-file", other)  # another file, e.g. keras_vgg16_weights switched
    assert "ignoring checkpoint" in switched and "epoch 1/1:" in switched, switched
