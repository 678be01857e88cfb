"""Allocation rules: which (token, latent) entries of a batch's pre-activations are kept.

Pure functions (the only module state is a lock, see `_serial`). All leading dims are one batch
of N tokens: z is the N x F matrix of pre-activations, T = N * F, M = floor(k * N).

Exact and fast. `mutual_choice` and `feature_choice` keep exactly what a full `torch.topk` keeps
(up to the choice among tied entries, below) without sorting or partially sorting all T entries:

1. Lower bound t on the cut-off. Mutual Choice: an order statistic of 65536 entries sampled with
   replacement, low enough that at least M entries lie at or above it except with probability
   about 3e-6. Feature Choice: for latent j, the m_j-th largest of G disjoint row-group maxima of
   z_j; it is never above the m_j-th largest z_j, because those m_j group maxima are distinct
   entries of column j.
2. Candidates z >= t, found with one full-size pass: the maxima of blocks of 8 rows; only the
   blocks whose maximum passes are read again. About 1.5 M (MC) and 1.1 M (FC) candidates.
3. The exact cut-off among the candidates only: `kthvalue` (MC), one sort keyed by (latent,
   value) (FC). Every entry that is not a candidate is below it, so the selection is exact.
4. If the bound misses (fewer than M candidates; MC only) or passes too many blocks (more than
   T / 32, e.g. massive ties), the plain path runs: the exact cut-off from `torch.topk`, then every
   entry above it and the first tied entries. Inputs under 65536 entries always take it.

The sample decides only how fast the answer is found, never the answer; it comes from a
generator with a fixed seed, so runs are reproducible.

Devices. The steps above, as written for the CPU, read data-dependent sizes (`nonzero`, candidate
counts, `bool(...)`), and on a GPU each such read is a host synchronisation. On any device other
than the CPU the same rule runs with static shapes instead (`_static_shapes`):

- Candidates come from `nonzero_static` into a buffer of fixed capacity C, padded with the
  out-of-range index T; C is fixed from host-known numbers only (N, F, k and, for Feature Choice,
  the capacities, which live on the host). The exact cut-off and the tie rule are then computed
  with fixed-size tensors (`topk` of C values, a running count of tied entries).
- Exactly one host synchronisation per call (`_host_bool`): whether the candidates were complete
  (no overflow of C, and for Mutual Choice the sampled bound did not miss). If not, a dense path
  with no synchronisation at all runs (the exact cut-off from `torch.topk`, ties by a running
  count over all T entries); inputs under 65536 entries take it directly, with none.
- Feature Choice capacities given on the device cost one more synchronisation (one copy to the
  host); the plugin's SAEs pass them from the host.
The result is the same as on the CPU, bit for bit, tie rule included.

Ties at the cut-off (project definition): exactly the budget is kept (MC: M entries when at least
M exist; FC: min(m_j, N) per latent before the relu), and among the entries equal to the cut-off
those with the lowest index are kept: lowest flattened index for MC, lowest row for FC.
`torch.topk` may keep other tied entries; the kept values are the same multiset.

Mutual Choice with a per-latent floor (`floored_mutual_choice`) is the two rules in sequence:
Feature Choice with capacity m for every latent, then Mutual Choice over the entries left; each
step keeps its own tie rule (its docstring).

Layout: `rules` (the rules and their dispatch), `cpu` (the candidate path and helpers shared
by every path), `static` (the static-shape path for accelerators), `capacities` (Feature Choice
capacities and Zipf ranks), `global_merge` (the same rules over a batch split across processes).
"""

from sae_lens_allocation.allocation.capacities import (
    ranks_from_frequency,
    uniform_capacities,
    zipf_capacities,
    zipf_targets,
)
from sae_lens_allocation.allocation.global_merge import (
    SINGLE_PROCESS,
    BatchGroup,
    Candidates,
    DataParallelError,
)
from sae_lens_allocation.allocation.rules import (
    Allocation,
    budget,
    feature_choice,
    floor_budget,
    floored_mutual_choice,
    mutual_choice,
)

__all__ = [
    "SINGLE_PROCESS",
    "Allocation",
    "BatchGroup",
    "Candidates",
    "DataParallelError",
    "budget",
    "feature_choice",
    "floor_budget",
    "floored_mutual_choice",
    "mutual_choice",
    "ranks_from_frequency",
    "uniform_capacities",
    "zipf_capacities",
    "zipf_targets",
]
