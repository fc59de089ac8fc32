localrules:
    download_weights,


rule download_weights:
    output:
        f"{WEIGHTS_DIR}/imagenet/{{filename}}",
    params:
        framework=lambda w: weights_owner(w.filename)[0],
        model=lambda w: weights_owner(w.filename)[1],
    log:
        "results/logs/download_weights/{filename}.log",
    container:
        TORCH_IMAGE
    shell:
        "python -m cnnbench.weights --framework {params.framework} --model {params.model} --out {output} > {log} 2>&1"


rule standin_weights_torch:
    output:
        f"{WEIGHTS_DIR}/standin/{{filename}}",
    wildcard_constraints:
        filename=weights_filenames("torch"),
    params:
        model=lambda w: weights_owner(w.filename)[1],
    log:
        "results/logs/standin_weights/{filename}.log",
    container:
        TORCH_IMAGE
    shell:
        "python -m cnnbench.torch_models standin --model {params.model} --out {output} > {log} 2>&1"


rule standin_weights_keras:
    output:
        f"{WEIGHTS_DIR}/standin/{{filename}}",
    wildcard_constraints:
        filename=weights_filenames("keras"),
    params:
        model=lambda w: weights_owner(w.filename)[1],
        backend=config["keras_backend"],
    log:
        "results/logs/standin_weights/{filename}.log",
    container:
        KERAS_IMAGE
    shell:
        "KERAS_BACKEND={params.backend} python -m cnnbench.keras_models standin --model {params.model} --out {output} > {log} 2>&1"
