# weights: pretrain. The torch trainer trains each pretrained/frozen model from scratch on the source classes,
# with pretrain.train's hyperparameters, resumable like any training (its checkpoint in PRETRAIN_DIR);
# the study's pretrained and frozen variants start from its model.pt (Keras ones from its port).


rule pretrain_torch:
    input:
        data=SOURCE_DATA,
    output:
        metrics=f"{PRETRAIN_DIR}/metrics.json",
        model=f"{PRETRAIN_DIR}/model.pt",
    params:
        hparams=pretrain_hparams_json,
        run_dir=PRETRAIN_DIR,
        seed=config["pretrain"]["seed"],
    log:
        f"{PRETRAIN_DIR}/train.log",
    priority: 10  # every pretrained and frozen run waits for it: start it before the scratch runs
    threads: training_threads
    resources:
        gpu=1,
    container:
        TORCH_IMAGE
    shell:
        f"OMP_NUM_THREADS={{threads}} {GPU_SLOT} python -m cnnbench.torch_trainer --variant torch-{{wildcards.model}}-scratch "
        "--seed {params.seed} --data {input.data} --hparams {params.hparams:q} --run-dir {params.run_dir} "
        "--metrics {output.metrics} --model-out {output.model} > {log} 2>&1"


rule port_pretrained_weights:
    input:
        f"{PRETRAIN_DIR}/model.pt",
    output:
        f"{PRETRAIN_DIR}/model{PORTED_SUFFIX}",
    log:
        f"{PRETRAIN_DIR}/port.log",
    container:
        TORCH_IMAGE
    shell:
        "python -m cnnbench.torch_models port --model {wildcards.model} --weights {input} --out {output} > {log} 2>&1"


rule port_weights_file:
    input:
        lambda w: config["weights_files"][w.model],
    output:
        f"{WEIGHTS_DIR}/file/{{model}}{PORTED_SUFFIX}",
    log:
        "results/logs/port_weights/file/{model}.log",
    container:
        TORCH_IMAGE
    shell:
        "python -m cnnbench.torch_models port --model {wildcards.model} --weights {input} --out {output} > {log} 2>&1"
