"""The one guard against a non-finite training loss, shared by every plugin training SAE.

A NaN or +-Inf loss stops training before any checkpoint or export with broken weights is
written. On the CPU, where reading a value costs nothing, the step that meets it raises at once.
On an accelerator a read would make the host wait for the device every step, so the step keeps
the first such step number on the device, and saving (a checkpoint or the export, both through
`process_state_dict_for_saving`) reads it and raises: one wait per save instead of one per step.
"""

from __future__ import annotations

from typing import Any

import torch

#: What to try when the activations are the likely cause.
ACTIVATIONS_ADVICE = (
    "Lower lr, check the activations for NaN/Inf, or use "
    "normalize_activations='expected_average_only_in'."
)


def reads_are_free(device: torch.device) -> bool:
    """Whether reading a value of a tensor on `device` costs no host-device synchronisation."""
    return device.type == "cpu"


class FiniteLossGuard:
    """Mixin for a plugin `TrainingSAE` (before the SAELens base class): `guard_loss` in every
    training step, and the check on every save. The first non-finite step is a plain tensor
    attribute on the loss's device (never saved, created at the first step off the CPU)."""

    #: What the error suggests trying.
    NONFINITE_ADVICE: str = ACTIVATIONS_ADVICE

    cfg: Any
    _first_nonfinite_step: torch.Tensor | None = None

    # Eager under `compile_sae: true`: a check, not part of the graph.
    @torch.compiler.disable
    def guard_loss(self, loss: torch.Tensor, step: int) -> None:
        """Raise `FloatingPointError` now (CPU) or at the next save (other devices) if `loss` is
        NaN or +-Inf at training step `step`."""
        if reads_are_free(loss.device):
            if not torch.isfinite(loss):
                raise FloatingPointError(self._nonfinite_message(str(loss.item()), step))
            return
        first = self._first_nonfinite_step
        if first is None:
            first = torch.full((), -1, dtype=torch.long, device=loss.device)
        elif first.device != loss.device:
            first = first.to(loss.device)
        bad = ~torch.isfinite(loss.detach()) & (first < 0)
        self._first_nonfinite_step = torch.where(bad, torch.full_like(first, step), first)

    def raise_if_nonfinite(self) -> None:
        """Raise `FloatingPointError` if a training step had a non-finite loss (one read of a
        device value)."""
        first = self._first_nonfinite_step
        if first is not None and not bool(first < 0):
            raise FloatingPointError(self._nonfinite_message("NaN or Inf", int(first)))

    def _nonfinite_message(self, loss: str, step: int) -> str:
        return (f"{self.cfg.architecture()} training met a non-finite loss ({loss}) at step "
                f"{step}; stopping before a broken checkpoint is written. {self.NONFINITE_ADVICE}")

    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        self.raise_if_nonfinite()
        super().process_state_dict_for_saving(state_dict)  # type: ignore[misc]
