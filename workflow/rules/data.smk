localrules:
    download_cifar10,


rule download_cifar10:
    output:
        CIFAR10_TARBALL,
    params:
        url=DATA_CONFIG["cifar10"]["url"],
        md5=DATA_CONFIG["cifar10"]["md5"],
    log:
        "results/logs/download_cifar10.log",
    container:
        TORCH_IMAGE
    shell:
        "python -m cnnbench.data download --url {params.url} --md5 {params.md5} --out {output} > {log} 2>&1"


rule prepare_data:
    input:
        data_source,
    output:
        DATA,
    params:
        data_config=json.dumps(DATA_CONFIG, sort_keys=True),
    log:
        "results/logs/prepare_data.log",
    container:
        TORCH_IMAGE
    shell:
        "python -m cnnbench.data prepare --data-config {params.data_config:q} --out {output} > {log} 2>&1"


rule split_classes:
    input:
        DATA,
    output:
        source=SOURCE_DATA,
        target=TARGET_DATA,
    params:
        classes=json.dumps(config["pretrain"].get("source_classes", [])),
    log:
        "results/logs/split_classes.log",
    container:
        TORCH_IMAGE
    shell:
        "python -m cnnbench.data split-classes --data {input} --source-classes {params.classes:q} "
        "--source-out {output.source} --target-out {output.target} > {log} 2>&1"
