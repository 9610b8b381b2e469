"""Training: cohort preparation, augmentation, split, checkpoints and run folder, the loop and DDP."""
