localrules:
    download_weights,
    offline_files,


# `snakemake --configfile ... --cores 1 offline_files` prints what an offline machine needs (and keeps
# it in its log): it has no output, so asking for it always runs it.
rule offline_files:
    log:
        "results/logs/offline_files.tsv",
    run:
        table = offline_table(offline_files(config))
        Path(log[0]).write_text(f"{table}\n")
        print(table)


rule download_weights:
    output:
        f"{WEIGHTS_DIR}/imagenet/{{filename}}",
    wildcard_constraints:
        filename=weights_filenames(),
    params:
        framework=lambda w: weights_owner(w.filename)[0],
        model=lambda w: weights_owner(w.filename)[1],
        release=lambda w: weights_release(w.filename),
    log:
        "results/logs/download_weights/{filename}.log",
    container:
        TORCH_IMAGE
    shell:
        "python -m cnnbench.weights --framework {params.framework} --model {params.model} {params.release} --out {output} > {log} 2>&1"


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


rule port_torch_weights_to_keras:
    input:
        f"{WEIGHTS_DIR}/{{source}}/{{stem}}.pth",
    output:
        f"{WEIGHTS_DIR}/{{source}}/{{stem}}{PORTED_SUFFIX}",
    wildcard_constraints:
        source="imagenet|standin",
    params:
        model=lambda w: torch_model_of(w.stem),
    log:
        "results/logs/port_weights/{source}/{stem}.log",
    container:
        TORCH_IMAGE
    shell:
        "python -m cnnbench.torch_models port --model {params.model} --weights {input} --out {output} > {log} 2>&1"
