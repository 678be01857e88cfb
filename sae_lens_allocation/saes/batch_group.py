"""The data-parallel seam of a plugin SAE: which processes share each training batch.

Every statistic of "the batch" that a plugin SAE computes in training (the allocation itself,
firing fractions, residual variances, gradient scales) is over the global batch, so that W
processes holding n_r rows each train exactly as one process holding all N = sum_r n_r rows
(docs/distributed.md). One process by default; `training/distributed.py` sets the group.
"""

from __future__ import annotations

from sae_lens_allocation.allocation import SINGLE_PROCESS, BatchGroup


class BatchGroupMixin:
    """`batch_group`: the processes sharing each training batch (a `BatchGroup`).

    Put it before the SAELens base class. `use_batch_group` is the one way to set it."""

    batch_group: BatchGroup = SINGLE_PROCESS

    def use_batch_group(self, group: BatchGroup) -> None:
        """Compute every batch statistic over `group`'s global batch from now on."""
        self.batch_group = group
