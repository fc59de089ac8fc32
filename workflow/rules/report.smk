rule summarize:
    input:
        all_metrics(),
    output:
        runs=report("results/summary.csv", caption="../report/runs.rst", category="Tables"),
        stats=report("results/variant_stats.csv", caption="../report/variant_stats.rst", category="Tables"),
        differences=report(
            "results/paired_differences.csv", caption="../report/paired_differences.rst", category="Tables"
        ),
        markdown="results/summary.md",
        curves=report("results/learning_curves.png", caption="../report/learning_curves.rst", category="Plots"),
        per_class=report(
            "results/per_class_accuracy.png", caption="../report/per_class_accuracy.rst", category="Plots"
        ),
        confusion=report(
            "results/confusion_matrices.png", caption="../report/confusion_matrices.rst", category="Plots"
        ),
        facts="results/summary_facts.json",
        lr_selection=report(
            "results/lr_selection.csv", caption="../report/lr_selection.rst", category="Tables"
        ),
        data_efficiency=report(
            "results/data_efficiency.png", caption="../report/data_efficiency.rst", category="Plots"
        ),
        pretraining_gain=report(
            "results/pretraining_gain.png", caption="../report/pretraining_gain.rst", category="Plots"
        ),
        conclusions=report("results/conclusions.md", caption="../report/conclusions.rst", category="Conclusions"),
    params:
        out_dir=lambda w, output: os.path.dirname(output.runs),
        expected=expected_runs(),
        target=(f"--target-val-accuracy {config['target_val_accuracy']}"
                if config["target_val_accuracy"] is not None else ""),
        # For the captions only: read from summary_facts.json when the report is built, against the
        # report's config. A param computed from `output` is no rerun trigger (Snakemake skips
        # params derived from input/output files).
        facts=lambda w, output: caption_facts(output.facts, expected_runs()),
        conclusions=lambda w, output: conclusions_text(output.conclusions),
    log:
        "results/logs/summarize.log",
    container:
        TORCH_IMAGE
    shell:
        "python -m cnnbench.report {input} --out-dir {params.out_dir} --expected {params.expected} {params.target} > {log} 2>&1"
