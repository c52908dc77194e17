"""Training: the trainer (the order of stages, epochs and steps), the parts of a run and their builder, the stages,
batches, loss, the DeepSpeed engine, checkpoints, the training log, preemption, the run directory's lock."""
