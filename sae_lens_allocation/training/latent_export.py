"""The export of a latent-sharded SAE: one SAELens folder (`jumprelu` or `topk`) that loads
anywhere without the plugin, written by rank 0 while the shards stream to it
(docs/distributed.md#latent-sharding).

The S ranks of data rank 0 (global ranks 0 .. S-1, one latent group) take part; every shard s

1. calibrates (Mutual/Feature Choice): saes/calibration.py over the latent group, which gives
   the thresholds of the unsharded SAE on the same rows (one global theta for Mutual Choice, the
   global quantile level a for Feature Choice), on calibration rows that are shard 0's on every
   shard (`broadcast_calibration_rows`);
2. computes its inference state dict with its own `process_state_dict_for_saving_inference`:
   each step of it is per latent (the decoder-norm fold W_enc[:, j] ||W_dec_j||, b_enc_j
   ||W_dec_j||, W_dec_j / ||W_dec_j||; the training buffers dropped; theta_j), so shard s's
   tensors are the unsharded export's latents s F/S .. (s+1) F/S - 1, and b_dec is replicated.

Streaming (`write_streamed_safetensors`): the safetensors file is the 8-byte header length, the
JSON header (name -> dtype, global shape, byte offsets; names in sorted order, tensors back to
back) and the tensors' bytes. Rank 0 knows every global shape from its own shard (shard shapes
are equal), so it writes the header and sizes the file first; then for each tensor and each shard
s, shard s broadcasts its piece over the latent group and rank 0 writes it at its offsets: one
contiguous run for a latent-first tensor ([F/S, ...] pieces are consecutive row blocks of
[F, ...]), one run of F/S entries per row for W_enc [d_in, F] (piece s is columns
s F/S .. (s+1) F/S - 1 of every row). Rank 0 thus holds its own shard (the SAE it trained and its
inference state dict) and one received piece (one tensor of one other shard) at a time; the whole
tensor is never assembled in memory (written pages sit in the OS page cache, which writes them
back and drops them). The broadcast rather than a send to rank 0 alone: it is `BatchGroup`'s
collective (errors become `DataParallelError`), and the export runs once.

cfg.json: rank 0's inference config with d_sae = F and the mesh in `metadata.training.
latent_shards` (provenance.py); sparsity.safetensors streams the same way; runner_cfg.json as
SAELens writes it. The folder is written hidden and published as every export (resume.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from sae_lens.constants import (
    RUNNER_CFG_FILENAME,
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
)

from sae_lens_allocation.allocation import BatchGroup
from sae_lens_allocation.allocation.latent_merge import ShardedBatchGroup
from sae_lens_allocation.saes.calibration import CalibrationRows
from sae_lens_allocation.training.latent_shards import latent_dim
from sae_lens_allocation.training.provenance import record_provenance
from sae_lens_allocation.training.resume import publish_folder

#: safetensors' dtype names.
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


@torch.no_grad()
def broadcast_calibration_rows(sae: Any, latents: BatchGroup) -> None:
    """Every shard of the latent group calibrates on shard 0's rows (the shards of a group read
    the same rows, but the thresholds must come from one set of rows bit for bit)."""
    rows = sae.default_calibration_rows()
    device = sae.W_enc.device
    count = torch.tensor([0 if rows is None else rows.acts.shape[0]], device=device)
    latents.broadcast_(count, 0)
    n = int(count)
    if n == 0:
        return
    if latents.rank == 0:
        acts = rows.acts.to(device=device, dtype=torch.float32).contiguous()
        documents = rows.documents.to(device=device, dtype=torch.long).contiguous()
    else:
        acts = torch.empty(n, sae.cfg.d_in, device=device)
        documents = torch.empty(n, dtype=torch.long, device=device)
    latents.broadcast_(acts, 0)
    latents.broadcast_(documents, 0)
    sae.set_calibration_source(CalibrationRows(acts, documents, {} if rows is None else rows.info))


def write_streamed_safetensors(
    path: Path | None, pieces: dict[str, torch.Tensor], d_sae: int, group: ShardedBatchGroup
) -> None:
    """One safetensors file of the unsharded tensors from every shard's `pieces` (same names,
    shapes and dtypes on every shard; `d_sae` = F / S latents per shard, `latent_dim` says which
    dimension runs over latents), written by shard 0 of the latent group at `path` (None on the
    other shards), streamed as the module doc says."""
    latents, shards = group.latents, group.shards
    writer = latents.rank == 0
    header: dict[str, Any] = {}
    plan = []
    offset = 0
    for name in sorted(pieces):
        piece = pieces[name].detach().contiguous()
        dim = latent_dim(name, piece, d_sae)
        shape = list(piece.shape)
        if dim is not None:
            shape[dim] *= shards
        size = math.prod(shape) * piece.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[piece.dtype], "shape": shape,
                        "data_offsets": [offset, offset + size]}
        plan.append((piece, dim, offset))
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes
    start = 8 + len(encoded)
    fd = None
    if writer:
        assert path is not None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if fd is not None:
            os.pwrite(fd, struct.pack("<Q", len(encoded)) + encoded, 0)
            os.ftruncate(fd, start + offset)
        for piece, dim, base in plan:
            if dim is None:
                # Replicated (b_dec): shard 0's.
                if fd is not None:
                    _write_rows(fd, piece, 0, 1, start + base)
                continue
            for s in range(shards):
                received = piece if s == latents.rank else torch.empty_like(piece)
                latents.broadcast_(received, s)
                if fd is not None:
                    _write_rows(fd, received, dim, shards, start + base, s)
        if fd is not None:
            os.fsync(fd)
    finally:
        if fd is not None:
            os.close(fd)


def _write_rows(fd: int, piece: torch.Tensor, dim: int, shards: int, base: int,
                shard: int = 0) -> None:
    """Write `piece`, shard `shard` of a tensor split along `dim` into `shards` pieces, at its
    place in the row-major tensor starting at byte `base`: with outer = prod(shape[:dim]) rows of
    `run` bytes in the piece, row i goes to base + (i shards + shard) run."""
    data = piece.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    outer = math.prod(piece.shape[:dim])
    rows = data.reshape(outer, -1).numpy()
    run = rows.shape[1]
    for i in range(outer):
        os.pwrite(fd, rows[i].tobytes(), base + (i * shards + shard) * run)


def save_sharded_export(runner: Any, sae: Any, trainer: Any, group: ShardedBatchGroup,
                        output_path: str | Path) -> None:
    """The export of a latent-sharded SAE into `output_path` (module doc). Called on the S ranks
    of data rank 0 with their shard; rank 0 writes."""
    writer = group.latents.rank == 0
    if hasattr(sae, "calibrate_for_export"):
        sae.calibrate_for_export()
    record_provenance(sae, runner.cfg, trainer.n_training_samples, runner.world_size,
                      runner.special_tokens, runner.resumes, latent_shards=group.shards)
    state = sae.state_dict()
    sae.process_state_dict_for_saving_inference(state)
    final = Path(output_path)
    tmp = final.parent / f".{final.name}.incomplete-{os.getpid()}"
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        write_streamed_safetensors(tmp / SAE_WEIGHTS_FILENAME if writer else None, state,
                                   sae.cfg.d_sae, group)
        sparsity = {"sparsity": trainer.log_feature_sparsity}
        write_streamed_safetensors(tmp / SPARSITY_FILENAME if writer else None, sparsity,
                                   sae.cfg.d_sae, group)
        if writer:
            config = sae.cfg.get_inference_sae_cfg_dict()
            config["d_sae"] = sae.cfg.d_sae * group.shards
            (tmp / SAE_CFG_FILENAME).write_text(json.dumps(config))
            (tmp / RUNNER_CFG_FILENAME).write_text(json.dumps(runner.cfg.to_dict()))
            publish_folder(tmp, final)
    finally:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
