"""Defaults of the test-time refinement (no torch import: the command line reads them for --help)."""

# the default of `atlasmorph register`/`segment`: +0.018 mean Dice on 14 training subjects of the shipped model for
# 5 steps at lr 0.05, within 0.0006 of 10 steps at 0.03 for half the time (benchmarks/refine_sweep.py); the same on
# the validation subjects (benchmarks/speed_settings.py; docs/benchmarks.md, section 3)
REFINE_STEPS = 5
REFINE_LR = 0.05
# --refine-loss: the image term of the refinement. "ncc" = local NCC (9^3 boxes, weight 1), which ignores a
# subject's intensity scale: chosen on 3 training subjects x 5 perturbations (docs/ood.md), where it never fell
# below the network's own warp. "model" = the term the model was trained with (MSE for the shipped model).
# NCC is the default since issue 16: on the 23 validation subjects 0.8041 against MSE's 0.8008, and on the
# out-of-distribution set it is ahead of MSE and of no refinement on every perturbation (docs/ood.md).
REFINE_LOSSES = ("ncc", "model")
REFINE_LOSS = "ncc"
NCC_REFINE_WEIGHT = 1.0
