"""Host-device copies that do not make the host wait for the device.

A copy between pageable host memory and a CUDA device blocks the host until the device has
caught up; from or to pinned memory with `non_blocking=True` it is queued like a kernel. These
helpers pin on CUDA and copy without blocking everywhere (on the CPU nothing is copied)."""

from __future__ import annotations

from typing import Any

import torch


def to_device_async(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` (a small host tensor) on `device`, queued without blocking the host."""
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def copy_to_host(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Start copying `tensor` to the host; returns (host tensor, event or None) for
    `wait_for_host_copy`. The host tensor must not be read before that."""
    if tensor.device.type == "cpu":
        return tensor.clone(), None
    cuda = tensor.device.type == "cuda"
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=cuda)
    host.copy_(tensor, non_blocking=True)
    event = None
    if cuda:
        event = torch.cuda.Event()
        event.record()
    return host, event


def wait_for_host_copy(started: tuple[torch.Tensor, Any]) -> torch.Tensor:
    """The host tensor of `copy_to_host`, once its copy has landed (at once when the device has
    passed it already, as it has when a later step read anything from the device)."""
    host, event = started
    if event is not None:
        event.synchronize()
    return host
