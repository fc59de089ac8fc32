# Any path under results/runs/ that no training rule makes (see common.smk, "run targets"): never runs,
# its input function stops the workflow with what is wrong and which runs the config has.
rule no_such_run_file:
    input:
        no_such_run_file,
    output:
        "results/runs/{path}",
    wildcard_constraints:
        path=NOT_A_TRAINING_FILE,
