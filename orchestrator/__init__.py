"""Ray-driven experiments: placement, workloads, sweeps, reports."""
