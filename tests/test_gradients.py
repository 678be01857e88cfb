"""activation_gradients and GradientActivationsStore: exact gradients, a backward pass that stops
at the hook, rows that stay aligned through SAELens' shuffle, checkpoint/resume, refusals."""

import numpy as np
import pytest
import torch
from datasets import Array2D, Dataset, Features
from sae_lens.training.activations_store import ActivationsStore

from sae_lens_allocation.registration import register_architecture
from sae_lens_allocation.saes.gradient_topk import GradientTopKTrainingSAE, GradientTopKTrainingSAEConfig
from sae_lens_allocation.training.gradients import GradientActivationsStore, activation_gradients

import support

register_architecture("gradient_topk", GradientTopKTrainingSAE, GradientTopKTrainingSAEConfig)


def _tokens(dataset, n_rows: int = 4) -> torch.Tensor:
    return torch.stack([torch.as_tensor(dataset[i]["tokens"]) for i in range(n_rows)])


def _reference(model, tokens, hook_name):
    """Plain autograd: parameters require grad, the hook tensor keeps its grad, mean-free sum."""
    kept = {}

    def keep(act, hook):
        act.retain_grad()
        kept["act"] = act
        return act

    logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, keep)])
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="sum"
    )
    loss.backward()
    model.zero_grad(set_to_none=True)
    return kept["act"].detach(), kept["act"].grad


@pytest.mark.parametrize(
    "hook_name", [support.HOOK_NAME, "blocks.1.hook_resid_pre", "blocks.1.attn.hook_z"]
)
def test_activation_gradients_equal_autograd_reference(tiny_model, tiny_dataset, hook_name):
    tokens = _tokens(tiny_dataset)
    acts, grads = activation_gradients(tiny_model, tokens, hook_name)
    ref_acts, ref_grads = _reference(tiny_model, tokens, hook_name)
    torch.testing.assert_close(acts, ref_acts)
    torch.testing.assert_close(grads, ref_grads)
    assert grads.abs().sum() > 0
    # Causal model: the last position predicts nothing, so its activation has no gradient.
    assert torch.all(grads[:, -1] == 0)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_no_backward_below_hook_and_no_parameter_gradient(tiny_dataset):
    model = support.tiny_model()
    fired_backward: list[str] = []
    below_requires_grad: list[bool] = []
    fired_param: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if name in ("embed", "pos_embed", "blocks.0", "blocks.1", "unembed"):
            handles.append(
                module.register_full_backward_hook(
                    lambda m, gi, go, name=name: fired_backward.append(name)
                )
            )
        if name in ("embed", "pos_embed", "blocks.0"):
            handles.append(
                module.register_forward_hook(
                    lambda m, i, out: below_requires_grad.append(out.requires_grad)
                )
            )
    for name, p in model.named_parameters():
        handles.append(p.register_hook(lambda g, name=name: fired_param.append(name)))

    activation_gradients(model, _tokens(tiny_dataset), "blocks.1.hook_resid_pre")
    for h in handles:
        h.remove()

    assert "blocks.1" in fired_backward and "unembed" in fired_backward  # backward above ran
    assert not {"embed", "pos_embed", "blocks.0"} & set(fired_backward)
    assert below_requires_grad and not any(below_requires_grad)  # no graph recorded below
    assert fired_param == []
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # flags restored


@pytest.fixture
def make_store(tmp_path, tiny_model, tiny_dataset):
    def make(cls=GradientActivationsStore):
        cfg = support.runner_cfg("gradient_topk", tmp_path)
        return cls.from_config(tiny_model, cfg, override_dataset=tiny_dataset)

    return make


def test_store_rows_are_acts_then_their_gradients(make_store):
    store = make_store()
    plain = make_store(ActivationsStore)
    tokens = plain.get_batch_tokens()
    rows, token_ids = store.get_raw_llm_batch()
    plain_acts, plain_ids = plain.get_activations(tokens).reshape(-1, 32), tokens.reshape(-1)
    assert rows.shape == (8 * 32, 64)
    torch.testing.assert_close(rows[:, :32], plain_acts)
    assert torch.equal(token_ids, plain_ids)
    _, grads = activation_gradients(store.model, tokens, support.HOOK_NAME)
    torch.testing.assert_close(rows[:, 32:], grads.reshape(-1, 32))


def test_rows_stay_aligned_through_the_shuffling_buffer(make_store):
    produced: list[torch.Tensor] = []

    class RecordingStore(GradientActivationsStore):
        def get_raw_llm_batch(self, raise_on_epoch_end=False):
            rows, ids = super().get_raw_llm_batch(raise_on_epoch_end)
            produced.append(rows)
            return rows, ids

    store = make_store(RecordingStore)
    served = torch.cat([next(store) for _ in range(3)])
    assert served.shape == (3 * 256, 64)
    pool = torch.cat(produced)
    # Every served row [acts | grads] is exactly one produced row: an activation never travels
    # with another row's gradient. Whole rows are compared, so identical activations (the same
    # prefix in two sequences) with different gradients cannot match the wrong row.
    produced_rows = {tuple(row) for row in pool.tolist()}
    assert all(tuple(row) in produced_rows for row in served.tolist())
    mismatched = torch.cat([served[:, :32], served[:, 32:].roll(1, dims=0)], dim=1)
    assert not all(tuple(row) in produced_rows for row in mismatched.tolist())
    # The buffer really shuffled: served rows are not the production order.
    assert not torch.equal(served, pool[: len(served)])


def test_store_checkpoint_resume_continues_the_stream(make_store, tmp_path):
    store = make_store()
    for _ in range(3):
        next(store)
    store.save_to_checkpoint(tmp_path)
    resumed = make_store()
    resumed.load_from_checkpoint(tmp_path)
    assert resumed.n_dataset_processed == store.n_dataset_processed > 0
    assert torch.equal(resumed.get_batch_tokens(), store.get_batch_tokens())


def _direct_store(model, **kwargs):
    base = dict(
        model=model, dataset=None, streaming=False, hook_name=support.HOOK_NAME,
        hook_head_index=None, context_size=32, d_in=32, n_batches_in_buffer=16,
        total_training_tokens=2048, store_batch_size_prompts=8, train_batch_size_tokens=256,
        prepend_bos=False, normalize_activations="none", device=torch.device("cpu"),
        dtype="float32",
    )
    return GradientActivationsStore(**{**base, **kwargs})


def test_store_refuses_activation_normalisation(tiny_model, tiny_dataset):
    with pytest.raises(ValueError, match="normalize_activations='expected_average_only_in'"):
        _direct_store(
            tiny_model, dataset=tiny_dataset, normalize_activations="expected_average_only_in"
        )


def test_a_cache_without_gradients_is_refused(tmp_path, tiny_model):
    cache = tmp_path / "cache"
    features = Features({support.HOOK_NAME: Array2D((32, 32), "float32")})
    Dataset.from_dict(
        {support.HOOK_NAME: np.zeros((8, 32, 32), dtype=np.float32)}, features=features
    ).save_to_disk(str(cache))
    with pytest.raises(ValueError, match=r"has no column 'blocks.0.hook_resid_post.grad'"):
        _direct_store(tiny_model, cached_activations_path=str(cache))
