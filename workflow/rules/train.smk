# One rule per framework: each runs in its own container, and never both in one process.
# `exec` twice: the shell becomes the GPU-slot launcher, which becomes the trainer (see cnnbench.gpu_slot),
# so the trainer's parent is the job's (its parent watchdog, training.StopRequested).

GPU_SLOT = "exec python -m cnnbench.gpu_slot --"

TRAIN_ARGS = (
    "--variant {wildcards.framework}-{wildcards.model}-{wildcards.init} --seed {wildcards.seed} "
    "--data {input.data} --hparams {params.hparams:q} --run-dir {params.run_dir} "
    "--metrics {output.metrics} --model-out {output.model} {params.weights}"
)


rule train_torch:
    input:
        data=TRAIN_DATA,
        weights=pretrained_weights,
        source=pretrain_source,
    output:
        metrics=f"{RUN_DIR}/metrics.json",
        model=f"{RUN_DIR}/model.pt",
    wildcard_constraints:
        framework="torch",
    params:
        hparams=hparams_json,
        run_dir=RUN_DIR,
        weights=weights_args,
    log:
        f"{RUN_DIR}/train.log",
    threads: training_threads
    resources:
        gpu=1,
    container:
        TORCH_IMAGE
    shell:
        f"OMP_NUM_THREADS={{threads}} {GPU_SLOT} python -m cnnbench.torch_trainer {TRAIN_ARGS} > {{log}} 2>&1"


rule train_keras:
    input:
        data=TRAIN_DATA,
        weights=pretrained_weights,
        source=pretrain_source,
    output:
        metrics=f"{RUN_DIR}/metrics.json",
        model=f"{RUN_DIR}/model.keras",
    wildcard_constraints:
        framework="keras",
    params:
        hparams=hparams_json,
        run_dir=RUN_DIR,
        weights=weights_args,
        backend=config["keras_backend"],
    log:
        f"{RUN_DIR}/train.log",
    threads: training_threads
    resources:
        gpu=1,
    container:
        KERAS_IMAGE
    shell:
        f"TF_NUM_INTRAOP_THREADS={{threads}} {GPU_SLOT} python -m cnnbench.keras_trainer --keras-backend {{params.backend}} {TRAIN_ARGS} > {{log}} 2>&1"
