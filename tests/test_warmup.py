"""The torch trainer's warm-up (every batch shape once, before the first timed step; torch.compile
compiles there), its compile fallback, and the float32 head under bf16 autocast. Torch runs in
subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import DEFAULT_HPARAMS, package_env, run_python
from test_reliability import comparable
from test_trainers import MODEL_SUFFIX, train

# A small network with what warm-up must leave untouched: BatchNorm statistics, dropout (the random
# stream), a momentum optimizer and a cosine schedule. 8x8 images: a CPU compile of it takes seconds.
WARM_UP = """
import json, numpy as np, torch
from torch import nn
from cnnbench import torch_trainer as tt
from cnnbench.torch_models import Float32Linear

COMPILED = {compiled}
cpu = torch.device("cpu")
torch.manual_seed(0)
network = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5),
                        Float32Linear(4 * 6 * 6, 10)).to(memory_format=torch.channels_last)
hp = {{"batch_size": 4, "eval_batch_size": 8, "lr_schedule": "cosine", "epochs": 3}}
optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
scheduler = tt.make_scheduler(optimizer, hp, steps_per_epoch=3)
images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (26, 8, 8, 3), dtype=np.uint8))
labels = torch.arange(26) % 10
x_train, y_train, x_val, y_val, x_test, y_test = images[:10], labels[:10], images[10:15], labels[10:15], \\
    images[15:], labels[15:]  # 10 images: batches of 4, 4, 2; validation 5; test 11: 8, 3
preprocess = tt.Preprocess(8, [0.5] * 3, [0.25] * 3, cpu)
batches = tt.warm_up_batches(x_train, y_train, (x_val, x_test), hp)
model = torch.compile(network) if COMPILED else network

seen = []  # (batch size, train mode, gradients on) of each forward pass (eager only: hooks are traced)
if not COMPILED:
    network.register_forward_pre_hook(lambda module, args: seen.append(
        [args[0].shape[0], module.training, torch.is_grad_enabled()]))

def state():
    grads = {{f"grad.{{k}}": None if p.grad is None else p.grad.clone() for k, p in network.named_parameters()}}
    return {{"tensors": {{**{{k: v.clone() for k, v in network.state_dict().items()}}, **grads}},
            "optimizer": {{k: {{n: t.clone() for n, t in s.items()}} for k, s in optimizer.state.items()}},
            "groups": [{{k: v for k, v in g.items() if k != "params"}} for g in optimizer.param_groups],
            "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
            "modes": [m.training for m in network.modules()]}}

def same(a, b):
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b

class NeverStop:
    def after_step(self, steps=1):
        return False

def warm_up():
    before = state()
    seconds = tt.warm_up(model, network, optimizer, scheduler, preprocess, batches, cpu, "fp32")
    return {{"unchanged": same(before, state()), "seconds": seconds}}

np.random.seed(1)
out = {{"sizes": {{"train": [len(y) for _, y in batches[0]], "eval": [len(x) for x in batches[1]]}}}}
out["fresh"] = {{**warm_up(), "optimizer_state": len(optimizer.state)}}
passes_of_one_warm_up = list(seen)
tt.train_one_epoch(model, optimizer, scheduler, x_train, y_train, preprocess, hp, cpu, "fp32", 7, NeverStop(), "epoch")
out["after_steps"] = {{**warm_up(), "optimizer_state": len(optimizer.state), "lr": optimizer.param_groups[0]["lr"]}}
out["passes"] = passes_of_one_warm_up
if COMPILED:  # every shape the run uses was compiled in the warm-up: a compile now raises
    torch._dynamo.config.error_on_recompile = True
    tt.train_one_epoch(model, optimizer, scheduler, x_train, y_train, preprocess, hp, cpu, "fp32", 8, NeverStop(), "e")
    for x, y in ((x_val, y_val), (x_test, y_test)):
        tt.evaluate(model, x, y, preprocess, hp, cpu, "fp32")
    out["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
print(json.dumps(out))
"""


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_warm_up_leaves_weights_optimizer_schedule_and_random_streams_as_they_were(compiled, tmp_path):
    out = run_python(WARM_UP.format(compiled=compiled), env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert out["sizes"] == {"train": [4, 2], "eval": [5, 8, 3]}  # full and partial batches, each set's tail
    assert out["fresh"]["unchanged"] and out["fresh"]["optimizer_state"] == 0  # never stepped: still no momentum
    assert out["after_steps"]["unchanged"] and out["after_steps"]["optimizer_state"] == 6
    assert 0 < out["after_steps"]["lr"] < 0.1  # the schedule had moved, and stayed where it was
    assert out["fresh"]["seconds"] > 0
    if compiled:
        assert out["graphs"] >= 3  # training, its partial batch, evaluation; none compiled after the warm-up
    else:  # training steps in train mode, evaluation in eval mode without gradients
        assert out["passes"] == [[4, True, True], [2, True, True], [5, False, False], [8, False, False],
                                 [3, False, False]]


BATCH_SIZES = """
import json, torch
from cnnbench.torch_trainer import warm_up_batches
x, y = torch.zeros(100, 2, 2, 3, dtype=torch.uint8), torch.zeros(100, dtype=torch.long)
def sizes(hp):
    n = hp.pop("train")
    train, evaluation = warm_up_batches(x[:n], y[:n], (x[:20], x[:30]), hp)
    return [[len(labels) for _, labels in train], [len(images) for images in evaluation]]
print(json.dumps({
    "tail": sizes({"train": 100, "batch_size": 16, "eval_batch_size": 64}),
    "even": sizes({"train": 96, "batch_size": 16, "eval_batch_size": 10}),
    "cut": sizes({"train": 100, "batch_size": 16, "eval_batch_size": 64, "max_steps_per_epoch": 2}),
    "small": sizes({"train": 5, "batch_size": 16, "eval_batch_size": 64}),
}))
"""


def test_warm_up_batches_cover_every_batch_size_of_the_run():
    out = run_python(BATCH_SIZES)
    assert out["tail"] == [[16, 4], [20, 30]]  # 100 = 6 x 16 + 4; validation 20, test 30 in one batch each
    assert out["even"] == [[16], [10]]  # 96 = 6 x 16; 20 and 30 in batches of 10
    assert out["cut"] == [[16], [20, 30]]  # max_steps_per_epoch: 2 full batches, no tail
    assert out["small"] == [[5], [20, 30]]  # fewer images than a batch: one batch of them all


@pytest.fixture(scope="module")
def uncompiled_run(tiny_dataset, tmp_path_factory):
    """A two-epoch run on the CPU (compile: auto does not compile there): (its metrics, its log)."""
    run_dir = tmp_path_factory.mktemp("uncompiled")
    result = train("torch", "torch-alexnet-scratch", tiny_dataset, run_dir, {"epochs": 2})
    return json.loads((run_dir / "metrics.json").read_text()), result.stderr


def test_trainer_records_the_warm_up_apart_from_the_epochs(uncompiled_run):
    metrics, log = uncompiled_run
    assert metrics["compile_seconds"] > 0
    assert metrics["train_seconds"] == sum(epoch["seconds"] for epoch in metrics["history"])
    assert metrics["environment"]["compiled"] is False and metrics["environment"]["precision"] == "fp32"
    assert log.count("warm-up (uncompiled): each batch shape once, ") == 1
    assert log.index("warm-up (uncompiled)") < log.index("epoch 1/2")


# A compiler that is not there: torch's inductor fails on it at the first call of the compiled model.
NO_COMPILER = {"CXX": "/nonexistent/c++"}


def trainer_argv(data, run_dir, hparams) -> list[str]:
    return ["--variant", "torch-alexnet-scratch", "--seed", "0", "--data", str(data), "--hparams",
            json.dumps({**DEFAULT_HPARAMS, **hparams}), "--run-dir", str(run_dir),
            "--metrics", str(run_dir / "metrics.json"), "--model-out", str(run_dir / MODEL_SUFFIX["torch"])]


def test_compile_failure_with_compile_auto_trains_uncompiled(uncompiled_run, tiny_dataset, tmp_path):
    # `auto` compiles on a GPU only: the trainer is made to compile here as it would there.
    code = f"""
import sys
from cnnbench import torch_trainer
torch_trainer.use_compile = lambda hp, device: True
sys.exit(torch_trainer.main({trainer_argv(tiny_dataset, tmp_path, {"compile": "auto", "epochs": 2})!r}))
"""
    env = package_env({**NO_COMPILER, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr
    failed = [line for line in result.stderr.splitlines() if line.startswith("torch.compile failed")]
    assert len(failed) == 1, result.stderr
    assert "InvalidCxxCompiler: No working C++ compiler found" in failed[0]
    assert "the run continues uncompiled (compile: auto)" in failed[0] and "apt-get install gcc g++" in failed[0]
    assert "warm-up (uncompiled)" in result.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["environment"]["compiled"] is False and metrics["compile_seconds"] > 0
    # The failed attempt left nothing behind: the run is the uncompiled one, bit for bit (torch on the CPU).
    uncompiled, _ = uncompiled_run
    assert comparable(metrics["history"]) == comparable(uncompiled["history"]) and len(metrics["history"]) == 2
    assert metrics["test"] == uncompiled["test"]


def test_compile_failure_with_compile_on_stops_and_says_what_to_install(tiny_dataset, tmp_path):
    result = train("torch", "torch-alexnet-scratch", tiny_dataset, tmp_path, {"compile": "on"}, check=False,
                   env={**NO_COMPILER, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert result.returncode == 1, result.stderr
    assert "error: torch.compile failed (InductorError: InvalidCxxCompiler: No working C++ compiler" in result.stderr
    assert "compile: on asks for it: install a C/C++ compiler and the Python headers" in result.stderr
    assert "apt-get install gcc g++ python3-dev" in result.stderr and "set compile: auto" in result.stderr
    assert not (tmp_path / "metrics.json").exists() and "epoch 1/1" not in result.stderr


HEAD_UNDER_AUTOCAST = """
import json, torch
import torch.nn.functional as F
from cnnbench.torch_models import Float32Linear, build_model
torch.manual_seed(0)
head, plain = Float32Linear(6, 3), torch.nn.Linear(6, 3)
calls = []
linear = F.linear
def recording_linear(x, weight, bias=None):
    calls.append([str(x.dtype), str(weight.dtype), torch.is_autocast_enabled("cpu")])
    return linear(x, weight, bias)
torch.nn.modules.linear.F.linear = recording_linear
x = torch.randn(2, 6).to(torch.bfloat16)  # what a layer under autocast hands the head
with torch.autocast("cpu", dtype=torch.bfloat16):
    out, plain_out = head(x), plain(x)
    model = build_model("alexnet", 10).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
        features = model.classifier[:-1](torch.flatten(model.avgpool(model.features(torch.randn(2, 3, 64, 64))), 1))
torch.nn.modules.linear.F.linear = linear
print(json.dumps({"out": str(out.dtype), "plain": str(plain_out.dtype), "head_call": calls[0],
                  "exact": torch.equal(out, F.linear(x.float(), head.weight, head.bias)),
                  "logits": str(logits.dtype), "features": str(features.dtype),
                  "heads": [type(build_model(name, 10).get_submodule(path)).__name__
                            for name, path in (("alexnet", "classifier.6"), ("resnet50", "fc"))]}))
"""


def test_head_computes_in_float32_under_bf16_autocast():
    out = run_python(HEAD_UNDER_AUTOCAST)
    assert out["plain"] == "torch.bfloat16"  # autocast is on: a plain Linear computes in bf16
    assert out["out"] == "torch.float32" and out["exact"]
    assert out["head_call"] == ["torch.float32", "torch.float32", False]  # input cast, autocast off inside
    assert out["features"] == "torch.bfloat16" and out["logits"] == "torch.float32"  # the network's own head
    assert out["heads"] == ["Float32Linear", "Float32Linear"]
