"""The one guard against a non-finite training loss, shared by every plugin training SAE."""

from __future__ import annotations

import torch

#: What to try when the activations are the likely cause.
ACTIVATIONS_ADVICE = (
    "Lower lr, check the activations for NaN/Inf, or use "
    "normalize_activations='expected_average_only_in'."
)


def check_finite_loss(loss: torch.Tensor, architecture: str, step: int, advice: str) -> None:
    """Raise `FloatingPointError` if `loss` is NaN or +-Inf: training stops at the step where it
    appears, before a checkpoint with broken weights can be written."""
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"{architecture} training met a non-finite loss ({loss.item()}) at step {step}; "
            f"stopping before a broken checkpoint is written. {advice}"
        )
