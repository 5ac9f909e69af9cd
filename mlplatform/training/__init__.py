"""Training: Ray Train and Tune, evaluation, the promotion gate, model cards."""
