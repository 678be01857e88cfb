"""Everything a plugin SAE computes, as in `sae_lens.saes`: one module per architecture (config and
training SAE together), the Mutual/Feature Choice base (`batch_allocation`), the auxiliary losses
(`aux_losses`) and their Zipf statistics (`zipf`), export threshold calibration (`calibration`)
and the data-parallel seam (`batch_group`). It never imports `training/`, `analysis/` or the CLI."""
