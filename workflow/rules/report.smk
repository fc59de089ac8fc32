rule summarize:
    input:
        all_metrics(),
    output:
        csv=SUMMARY_FILES[0],
        markdown=SUMMARY_FILES[1],
        plot=SUMMARY_FILES[2],
    log:
        "results/logs/summarize.log",
    container:
        TORCH_IMAGE
    shell:
        "python -m cnnbench.report {input} --csv {output.csv} --markdown {output.markdown} "
        "--plot {output.plot} > {log} 2>&1"
