"""One module per plugin architecture, config and training SAE together (as in `sae_lens.saes`)."""
