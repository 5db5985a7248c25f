"""Training: the Ray-free training loop every worker runs, and where the train stage puts its outputs."""
