"""``make docs``: regenerate docs/experiments.md, its figures and README.md's performance table.

Everything written comes from results stored in the repository: ``docs/results/<key>/result.json`` (a
study's result, see :mod:`resviz.experiments`), ``docs/results/cpu.json`` (the CPU seconds each of
those runs took), ``bench/results/<name>.json`` (saved ``bench/bench.py --json`` outputs) and
``pretrained/manifest.json`` (the shipped checkpoints' accuracy).

    python -m scripts.docgen                 # rewrite the docs from the stored results (make docs)
    python -m scripts.docgen --no-figures    # markdown only
    python -m scripts.docgen results [KEY..] # run the studies again and store their results (slow)
"""
