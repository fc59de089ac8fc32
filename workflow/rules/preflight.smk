localrules:
    preflight,


# `snakemake --cores 1 preflight` (add --use-singularity for the images): will the trainings see the GPU?
# No output, so asking for it always runs it. Each probe runs where that framework's trainings run (the
# same environment, or its image with the same apptainer args); preflight removes their files (temp) itself,
# also when it fails, and their invocation param reruns them each time. See cnnbench.preflight.
rule preflight:
    input:
        preflight_probes,
    log:
        "results/logs/preflight.txt",
    run:
        preflight.run(input, log[0], config, preflight_route())


rule preflight_torch:
    output:
        temp("results/preflight/{framework}.json"),
    wildcard_constraints:
        framework="torch",
    params:
        invocation=PREFLIGHT_INVOCATION,
    log:
        "results/logs/preflight/{framework}.log",
    container:
        TORCH_IMAGE
    shell:
        (
            "python -m cnnbench.preflight probe --framework torch --invocation {params.invocation} "
            "--out {output} > {log} 2>&1"
        )


rule preflight_keras:
    output:
        temp("results/preflight/{framework}.json"),
    wildcard_constraints:
        framework="keras",
    params:
        backend=config["keras_backend"],
        invocation=PREFLIGHT_INVOCATION,
    log:
        "results/logs/preflight/{framework}.log",
    container:
        KERAS_IMAGE
    shell:
        (
            "python -m cnnbench.preflight probe --framework keras --keras-backend {params.backend} "
            "--invocation {params.invocation} --out {output} > {log} 2>&1"
        )
