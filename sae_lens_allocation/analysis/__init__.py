"""Tools that read trained SAEs: evaluation, side-by-side comparison, feature dashboards."""
