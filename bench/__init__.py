"""``blended-diffusion bench``: benchmark-scale editing and evaluation (PIE-Bench or a manifest), in this
process or on a Ray cluster. data.py reads datasets, worker.py edits and measures one item with loaded models,
runner.py feeds the items to one local worker or to Ray actors and writes what comes back, report.py
summarises, command.py is the subcommand. The metrics are models/metrics.py (shared with Evaluate Edit and
the fidelity curve)."""
