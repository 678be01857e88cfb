"""Sparse training step (`use_sparse_activations`, SAELens' TopK field): codes kept as lists of
(row, latent, value) entries, decoded and back-propagated without any dense N x F product.

Dense step (SAELens TopK): z = (x - b_dec) W_enc + b_enc, times ||W_dec_j|| with
`rescale_acts_by_decoder_norm`; f = the architecture's codes of z; x_hat = (f / ||W_dec||) W_dec
+ b_dec. Its backward multiplies dense N x F matrices: grad_f = grad_x_hat W_dec^T,
grad_W_dec = f^T grad_x_hat and grad_W_enc = (x - b_dec)^T grad_z, although grad_z is zero outside
the M selected entries. With the selection S = {(n_e, j_e)} in row-major order (this module):

    forward    f_e = relu(z_{n_e j_e}),  x_hat_n = sum_{e: n_e = n} a_e W_dec[j_e] + b_dec,
               a_e = f_e / ||W_dec_{j_e}|| (or f_e without the rescale)
    backward   grad_a_e = grad_x_hat[n_e] . W_dec[j_e]             (sampled dense-dense product)
               grad_W_dec[j] = sum_{e: j_e = j} a_e grad_x_hat[n_e]   (sparse x dense)
               grad_z_e = the chain rule through relu and the rescale, then with g_e = grad of
               the unscaled z at e:
               grad_W_enc[:, j] = sum_{e: j_e = j} g_e (x - b_dec)[n_e],   grad_b_enc[j] = sum g_e,
               grad_(x - b_dec)[n] = sum_{e: n_e = n} g_e W_enc[:, j_e]   (so b_dec's share)

Each product costs O(M d) instead of O(N F d); only the encoder forward x W_enc stays dense (the
selection needs every z). The decoder norms and the gather by latent are ordinary autograd ops
on vectors of size F and M, so the gradient through ||W_dec_j|| is exact as in the dense path.
Results equal the dense step's up to the order of floating-point summation. The products run in
the parameters' dtype with autocast off (sparse matmuls have no bfloat16 kernel everywhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.saes.topk_sae import TopK

from sae_lens_allocation.validation import field_error


@dataclass(frozen=True)
class Selection:
    """Entries (rows[e], cols[e]) of an n_rows x n_cols matrix, sorted row-major, no repeats;
    `crow` the CSR row offsets ([n_rows + 1])."""

    rows: torch.Tensor
    cols: torch.Tensor
    crow: torch.Tensor
    n_rows: int
    n_cols: int

    @staticmethod
    def from_sorted(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int) -> Selection:
        """From entries already sorted row-major."""
        counts = torch.bincount(rows, minlength=n_rows)
        crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return Selection(rows, cols, crow, n_rows, n_cols)

    @staticmethod
    def from_flat(flat: torch.Tensor, n_rows: int, n_cols: int) -> Selection:
        """From flat indices row * n_cols + col (any order; sorted here)."""
        flat = flat.sort().values
        rows = torch.div(flat, n_cols, rounding_mode="floor")
        return Selection.from_sorted(rows, flat - rows * n_cols, n_rows, n_cols)

    @staticmethod
    def from_coalesced(codes: torch.Tensor) -> Selection:
        """The entries of a coalesced 2-D sparse COO tensor (its indices are sorted row-major)."""
        rows, cols = codes.indices()
        return Selection.from_sorted(rows, cols, codes.shape[0], codes.shape[1])

    @staticmethod
    def from_nonzero(codes: torch.Tensor) -> Selection:
        """The nonzero entries of a 2-D matrix."""
        flat = codes.reshape(-1).nonzero().squeeze(1)
        return Selection.from_flat(flat, codes.shape[0], codes.shape[1])

    @staticmethod
    def from_row_indices(indices: torch.Tensor, n_cols: int) -> Selection:
        """Latents `indices` [N, s] of each row (distinct within a row)."""
        n_rows = indices.shape[0]
        base = torch.arange(n_rows, device=indices.device)[:, None] * n_cols
        return Selection.from_flat((base + indices).reshape(-1), n_rows, n_cols)

    def flat(self) -> torch.Tensor:
        return self.rows * self.n_cols + self.cols


def sparse_times_dense(
    rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n_rows: int, dense: torch.Tensor,
    coalesced: bool,
) -> torch.Tensor:
    """S @ dense, S [n_rows, dense.shape[0]] holding `values` at (rows, cols), in dense's dtype."""
    with torch.autocast(device_type=dense.device.type, enabled=False):
        sparse = torch.sparse_coo_tensor(
            torch.stack([rows, cols]), values.to(dense.dtype), (n_rows, dense.shape[0]),
            is_coalesced=coalesced, check_invariants=False,
        )
        return torch.sparse.mm(sparse, dense)


def sampled_products(selection: Selection, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """(left[rows[e]] . right[cols[e]]) for every entry e, without the dense left @ right^T."""
    if selection.rows.numel() == 0:
        return left.new_zeros(0)
    with torch.autocast(device_type=left.device.type, enabled=False):
        right = right.to(left.dtype)
        mask = torch.sparse_csr_tensor(
            selection.crow, selection.cols, left.new_zeros(selection.rows.numel()),
            (selection.n_rows, selection.n_cols), check_invariants=False,
        )
        return torch.sparse.sampled_addmm(mask, left, right.T).values()


class _SelectedPreActs(torch.autograd.Function):
    """z[rows, cols] of z = sae_in W_enc + b_enc (given, computed without autograd), with the
    gradient into sae_in, W_enc and b_enc by sparse products (module docstring)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, selection: Selection, sae_in: torch.Tensor,
                W_enc: torch.Tensor, b_enc: torch.Tensor) -> torch.Tensor:
        ctx.selection = selection
        ctx.save_for_backward(sae_in, W_enc)
        ctx.b_enc_dtype = b_enc.dtype
        return z.reshape(-1)[selection.flat()]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        sel: Selection = ctx.selection
        sae_in, W_enc = ctx.saved_tensors
        grad = grad.to(W_enc.dtype)
        grad_sae_in = grad_W_enc = grad_b_enc = None
        if ctx.needs_input_grad[2]:
            grad_sae_in = sparse_times_dense(sel.rows, sel.cols, grad, sel.n_rows, W_enc.T, True)
            grad_sae_in = grad_sae_in.to(sae_in.dtype)
        if ctx.needs_input_grad[3]:
            # grad_W_enc^T = S^T (x - b_dec): one row per latent.
            grad_W_enc = sparse_times_dense(
                sel.cols, sel.rows, grad, sel.n_cols, sae_in.to(W_enc.dtype), False
            ).T
        if ctx.needs_input_grad[4]:
            grad_b_enc = grad.new_zeros(sel.n_cols).index_add_(0, sel.cols, grad)
            grad_b_enc = grad_b_enc.to(ctx.b_enc_dtype)
        return None, None, grad_sae_in, grad_W_enc, grad_b_enc


class _SparseDecode(torch.autograd.Function):
    """sum_{e: rows[e] = n} a_e W_dec[cols[e]] for every row n ([n_rows, d]), with the gradient
    into a (sampled products) and W_dec (sparse x dense)."""

    @staticmethod
    def forward(ctx: Any, selection: Selection, a: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
        ctx.selection = selection
        ctx.save_for_backward(a, W_dec)
        return sparse_times_dense(selection.rows, selection.cols, a, selection.n_rows, W_dec, True)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        sel: Selection = ctx.selection
        a, W_dec = ctx.saved_tensors
        grad_out = grad_out.to(W_dec.dtype).contiguous()
        grad_a = grad_W_dec = None
        if ctx.needs_input_grad[1]:
            grad_a = sampled_products(sel, grad_out, W_dec).to(a.dtype)
        if ctx.needs_input_grad[2]:
            grad_W_dec = sparse_times_dense(sel.cols, sel.rows, a, sel.n_cols, grad_out, False)
        return None, grad_a, grad_W_dec


@dataclass
class SparseEncoding:
    """One training step's encoder state for sparse codes.

    z: sae_in W_enc + b_enc ([N, F], no autograd), before the decoder-norm rescale.
    sae_in, W_enc, b_enc: the autograd inputs of z.
    norms: ||W_dec_j|| with autograd when `rescale_acts_by_decoder_norm`, else None.
    hidden_pre: z times the norms, no autograd: what selections are made from.
    """

    z: torch.Tensor
    sae_in: torch.Tensor
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    norms: torch.Tensor | None
    hidden_pre: torch.Tensor

    def pre_acts(self, selection: Selection) -> torch.Tensor:
        """hidden_pre at the selected entries, with autograd into W_enc, b_enc, sae_in and,
        through the norms, W_dec: z_e * ||W_dec_{j_e}||, as the dense hidden_pre computes it."""
        values = _SelectedPreActs.apply(self.z, selection, self.sae_in, self.W_enc, self.b_enc)
        if self.norms is not None:
            values = values * self.norms[selection.cols]
        return values


def decode_entries(
    selection: Selection, values: torch.Tensor, W_dec: torch.Tensor, rescale: bool
) -> torch.Tensor:
    """sum_e values_e W_dec[j_e] / ||W_dec_{j_e}|| per row (no b_dec): SAELens'
    `act_times_W_dec(f, W_dec, rescale)` for codes f holding `values` at `selection`."""
    if rescale:
        # The reciprocal first, as act_times_W_dec multiplies by 1 / ||W_dec||.
        values = values * (1 / W_dec.norm(dim=-1))[selection.cols]
    return _SparseDecode.apply(selection, values, W_dec)


def sparse_codes(selection: Selection, values: torch.Tensor) -> torch.Tensor:
    """The codes as SAELens' sparse TopK gives them: a coalesced COO tensor [N, F]."""
    return torch.sparse_coo_tensor(
        torch.stack([selection.rows, selection.cols]), values,
        (selection.n_rows, selection.n_cols), is_coalesced=True, check_invariants=False,
    )


def firing_per_latent(feature_acts: torch.Tensor) -> torch.Tensor:
    """sum_n [f_nj != 0] for every latent j (float32 [F]), for dense or sparse COO codes."""
    if feature_acts.is_sparse:
        acts = feature_acts.coalesce()
        cols = acts.indices()[-1]
        fired = (acts.values() != 0).to(torch.float32)
        return fired.new_zeros(acts.shape[-1]).index_add_(0, cols, fired)
    fired = feature_acts.reshape(-1, feature_acts.shape[-1]) != 0
    return fired.sum(dim=0, dtype=torch.float32)


def firing_per_token(feature_acts: torch.Tensor) -> torch.Tensor:
    """sum_j [f_nj != 0] for every token n (float32 [N]), for dense or 2-D sparse COO codes."""
    if feature_acts.is_sparse:
        acts = feature_acts.coalesce()
        rows = acts.indices()[0]
        fired = (acts.values() != 0).to(torch.float32)
        return fired.new_zeros(acts.shape[0]).index_add_(0, rows, fired)
    fired = feature_acts.reshape(-1, feature_acts.shape[-1]) != 0
    return fired.sum(dim=-1, dtype=torch.float32)


def validate_sparse_activations(cfg: Any) -> None:
    """`use_sparse_activations` must be true or false (a config check for every plugin SAE)."""
    if not isinstance(cfg.use_sparse_activations, bool):
        raise field_error("use_sparse_activations", cfg.use_sparse_activations, "true or false")


class SparseActivationsMixin:
    """`use_sparse_activations: true` for a SAELens `TopKTrainingSAE` subclass (put it before
    the SAELens base class): in training mode, for 2-D inputs, `encode_with_hidden_pre` returns
    the codes as a coalesced sparse COO tensor (what SAELens' own sparse TopK returns, so its
    trainer's firing counts, L0 and dead masks read them as they are) and the dense hidden_pre
    without autograd; `decode` decodes them by `decode_entries`. The selection is the
    architecture's own: its activation function runs on hidden_pre without autograd and the
    nonzero entries of its codes are the entries kept (a kept entry whose relu is 0 has value 0
    and gradient 0 in the dense step too). `decode` takes any 2-D sparse COO codes. Eval mode,
    and inputs with more leading dims, take the dense path; so does the export.
    `sparse_encoding` holds the step's encoder state from the encode to the end of
    `training_forward_pass` (the auxiliary losses select from it).
    """

    cfg: Any
    sparse_encoding: SparseEncoding | None = None

    def uses_sparse_codes(self, x: torch.Tensor) -> bool:
        return bool(self.cfg.use_sparse_activations) and self.training and x.dim() == 2  # type: ignore[attr-defined]

    def get_activation_fn(self) -> Any:
        # SAELens' TopK with its own sparse output off: the sparse codes are built here.
        return TopK(self.cfg.k, use_sparse_activations=False)

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.uses_sparse_codes(x):
            self.sparse_encoding = None
            return super().encode_with_hidden_pre(x)  # type: ignore[misc]
        return _encode_sparse(self, x)

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        if not (feature_acts.is_sparse and feature_acts.dim() == 2):
            return super().decode(feature_acts)  # type: ignore[misc]
        sae: Any = self
        recons = decode_sparse_codes(feature_acts, sae.W_dec, self.cfg.rescale_acts_by_decoder_norm)
        sae_out_pre = sae.hook_sae_recons(recons + sae.b_dec)
        sae_out_pre = sae.run_time_activation_norm_fn_out(sae_out_pre)
        return sae.reshape_fn_out(sae_out_pre, sae.d_head)

    def training_forward_pass(self, step_input: Any) -> Any:
        try:
            return super().training_forward_pass(step_input)  # type: ignore[misc]
        finally:
            # z of the whole batch is no longer needed once the losses are built.
            self.sparse_encoding = None


@torch.compiler.disable
def decode_sparse_codes(feature_acts: torch.Tensor, W_dec: torch.Tensor, rescale: bool) -> torch.Tensor:
    """`decode_entries` of 2-D sparse COO codes, run eagerly under `compile_sae` (the compiler
    does not trace sparse tensors or data-dependent entry counts)."""
    feature_acts = feature_acts.coalesce()
    return decode_entries(Selection.from_coalesced(feature_acts), feature_acts.values(), W_dec, rescale)


@torch.compiler.disable
def _encode_sparse(sae: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse codes and the dense hidden_pre (no autograd) of a training batch; run eagerly
    under `compile_sae` (selection sizes are data-dependent)."""
    sae_in = sae.process_sae_in(x)
    norms = sae.W_dec.norm(dim=-1) if sae.cfg.rescale_acts_by_decoder_norm else None
    with torch.no_grad():
        z = sae.hook_sae_acts_pre(sae_in @ sae.W_enc + sae.b_enc)
        hidden_pre = z * norms.detach() if norms is not None else z
        codes = sae.activation_fn(hidden_pre)
        selection = Selection.from_nonzero(codes)
        del codes
    encoding = SparseEncoding(z, sae_in, sae.W_enc, sae.b_enc, norms, hidden_pre)
    sae.sparse_encoding = encoding
    values = encoding.pre_acts(selection).relu()
    return sae.hook_sae_acts_post(sparse_codes(selection, values)), hidden_pre
