"""One run (design §7, §8, §10): the training driver, its run directory and checkpoints, evaluation,
the command lines, progress and provenance."""
