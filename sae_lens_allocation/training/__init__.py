"""Training machinery: auxiliary losses, threshold calibration, the gradient-carrying activation
store, model and data sources, and the glue to SAELens' runner (as in `sae_lens.training`)."""
