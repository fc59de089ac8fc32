def _filenames(framework):
    return "|".join(spec.filename.replace(".", r"\.") for (fw, _), spec in PRETRAINED.items() if fw == framework)


def _model_of(filename):
    return next(model for (_, model), spec in PRETRAINED.items() if spec.filename == filename)


localrules:
    download_weights,


rule download_weights:
    output:
        f"{WEIGHTS_DIR}/imagenet/{{filename}}",
    params:
        framework=lambda w: next(fw for (fw, _), spec in PRETRAINED.items() if spec.filename == w.filename),
        model=lambda w: _model_of(w.filename),
    log:
        "results/logs/download_weights/{filename}.log",
    shell:
        "{PYTHON} cnnbench.weights --framework {params.framework} --model {params.model} --out {output} > {log} 2>&1"


rule standin_weights_torch:
    output:
        f"{WEIGHTS_DIR}/standin/{{filename}}",
    wildcard_constraints:
        filename=_filenames("torch"),
    params:
        model=lambda w: _model_of(w.filename),
    log:
        "results/logs/standin_weights/{filename}.log",
    container:
        config["containers"]["torch"]
    shell:
        "{PYTHON} cnnbench.torch_models --model {params.model} --out {output} > {log} 2>&1"


rule standin_weights_keras:
    output:
        f"{WEIGHTS_DIR}/standin/{{filename}}",
    wildcard_constraints:
        filename=_filenames("keras"),
    params:
        model=lambda w: _model_of(w.filename),
    log:
        "results/logs/standin_weights/{filename}.log",
    container:
        config["containers"]["tensorflow"]
    shell:
        "KERAS_BACKEND={config[keras_backend]} {PYTHON} cnnbench.keras_models --model {params.model} --out {output} > {log} 2>&1"
