"""The streaming speed benchmark (``scripts/benchmark.py`` is its command line; docs/benchmarks.md its figures).

One job per file: ``settings`` (the flags resolved against a config into the config ``build.py`` builds),
``runner`` (build the pipeline, time it, assemble the JSON record), ``timing`` (clock, phase-hook marks, the
timed stream, text encoding), ``memory`` (peak memory, weight bytes), ``flops`` (DiT and VAE work per block)
and ``report`` (machine, figures of the record, the table).
"""
