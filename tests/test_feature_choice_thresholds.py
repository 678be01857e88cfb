"""Feature Choice trained with its export's rule (`training_rule: thresholds`): the training-mode
encoder is the export, with no calibration; the thresholds track the target rates q_j."""

from __future__ import annotations

import pytest
import torch

import support

D_IN, D_SAE, K = 16, 64, 4.0


def _sae(**fields):
    fields = {"training_rule": "thresholds", **fields}
    return support.plugin_sae("feature_choice", d_in=D_IN, d_sae=D_SAE, k=K, b_enc_std=0.1,
                              uneven_decoder=True, **fields)


def _rows(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.rand(n, 8, generator=g).pow(4)
    return codes @ torch.randn(8, D_IN, generator=torch.Generator().manual_seed(0)) * 3 + 0.3 * torch.randn(
        n, D_IN, generator=g
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [("training_rule", "banana"), ("threshold_learning_rate", 0.0),
     ("threshold_learning_rate", 1.5), ("threshold_learning_rate", float("nan")),
     ("threshold_learning_rate", True)],
)
def test_bad_fields_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field) as error:
        _sae(**{field: value})
    assert "\n" not in str(error.value)


def test_the_first_batch_sets_the_feature_choice_cut_offs():
    from sae_lens_allocation.allocation import feature_choice

    sae = _sae()
    x = _rows(256, 1)
    output = support.training_step(sae, x)
    z = output.hidden_pre.detach()
    # The start is the cut-off of the first batch's Feature Choice (same generator draw).
    reference = _sae()
    caps = reference.capacities(256)
    start = feature_choice(z, caps).cutoff.clamp(min=0)
    assert torch.equal(output.feature_acts, z.relu() * (z > start))


def test_the_export_is_the_training_mode_encoder_without_calibration(tmp_path):
    from sae_lens import SAE

    sae = _sae()
    for step in range(30):
        support.training_step(sae, _rows(256, step), step=step)
    assert int(sae.threshold_updates) == 30
    theta = sae.threshold.clone()
    held_out = _rows(512, 99)
    sae.train()
    training_codes = sae.encode(held_out)
    sae.eval()
    sae.save_inference_model(tmp_path)  # no calibration data attached, none needed
    assert torch.equal(sae.threshold, theta)
    assert sae.cfg.metadata.calibration["source"] == "training-thresholds"
    exported = SAE.load_from_disk(tmp_path)
    torch.testing.assert_close(exported.encode(held_out), training_codes, rtol=1e-4, atol=1e-5)


def test_the_rates_converge_to_their_targets():
    """Pre-activations from one fixed distribution (scales over two decades, some latents rarely
    positive): after 100 steps of tracking the mean rates over the next 100 batches are the
    targets q_j = k / F, or P(z_j > 0) where that is less (relu: nothing fires more)."""
    g = torch.Generator().manual_seed(2)
    scale = 10 ** (2 * torch.rand(D_SAE, generator=g) - 1)
    shift = scale * torch.linspace(-2.5, 0.5, D_SAE)
    sae = _sae()
    fired = torch.zeros(D_SAE)
    positive = torch.zeros(D_SAE)
    with torch.no_grad():
        for step in range(200):
            z = torch.randn(512, D_SAE, generator=g) * scale + shift
            allocation = sae.allocate(z)
            sae.update_running_threshold(allocation.cutoff)
            if step >= 100:
                fired += (allocation.codes != 0).sum(0)
                positive += (z > 0).sum(0)
    rates, reachable = fired / 51200, torch.minimum(positive / 51200, torch.tensor(K / D_SAE))
    assert int((positive / 51200 < K / D_SAE).sum()) > 0  # some targets are out of reach
    assert float(rates.sum()) == pytest.approx(float(reachable.sum()), rel=0.02)
    assert float((rates / reachable - 1).abs().max()) < 0.1
