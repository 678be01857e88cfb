"""Hugging Face models through SAELens' `model_class_name: AutoModelForCausalLM` path (its
`HookedProxyLM`): a tiny randomly initialised GPT-2 built from a config and saved to a local
folder trains Gradient TopK and Mutual Choice SAEs offline, and the gradient store's gradients
are the LM loss's gradients at the Hugging Face module's output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sae_lens import SAE
from sae_lens.load_model import HookedProxyLM, load_model

from sae_lens_allocation.training.gradients import activation_gradients
from sae_lens_allocation.training.runner import train

import support

HF_HOOK = "transformer.h.0"  # the first GPT-2 block's output (the residual stream after it)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 (d_model 32) with random weights and the test tokenizer, saved as
    `save_pretrained` writes it, so `AutoModelForCausalLM.from_pretrained(folder)` loads it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = support.tiny_tokenizer()
    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=support.CONTEXT_SIZE, n_embd=support.D_MODEL, n_layer=2,
        n_head=4, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_gradients_at_a_hugging_face_module_equal_autograd(hf_folder, tiny_dataset):
    model = load_model("AutoModelForCausalLM", str(hf_folder), device="cpu", hook_names=[HF_HOOK])
    assert isinstance(model, HookedProxyLM)
    tokens = torch.stack([torch.as_tensor(tiny_dataset[i]["tokens"]) for i in range(4)])
    acts, grads = activation_gradients(model, tokens, HF_HOOK)

    kept = {}

    def keep(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden.retain_grad()
        kept["act"] = hidden

    handle = model.model.transformer.h[0].register_forward_hook(keep)
    logits = model.model(tokens).logits
    handle.remove()
    torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum"
    ).backward()
    model.zero_grad(set_to_none=True)
    assert acts.shape == grads.shape == (4, support.CONTEXT_SIZE, support.D_MODEL)
    torch.testing.assert_close(acts, kept["act"].detach())
    torch.testing.assert_close(grads, kept["act"].grad)
    assert grads.abs().sum() > 0 and torch.all(grads[:, -1] == 0)


@pytest.mark.parametrize(("architecture", "exported"), [("gradient_topk", "topk"), ("mutual_choice", "jumprelu")])
def test_trains_on_an_auto_model_for_causal_lm(architecture, exported, hf_folder, tiny_dataset, tmp_path):
    overrides = {"sae_k": 8}
    if architecture == "mutual_choice":
        overrides["sae_calibration_tokens"] = 1024
    cfg = support.runner_cfg_dict(
        architecture, tmp_path, model_class_name="AutoModelForCausalLM", model_name=str(hf_folder),
        hook_name=HF_HOOK, **overrides,
    )
    trained = train(cfg, override_dataset=tiny_dataset)
    assert trained.cfg.architecture() == architecture
    sae = SAE.load_from_disk(cfg["output_path"])
    assert sae.cfg.architecture() == exported
    assert sae.cfg.metadata.training_architecture == architecture
    assert sae.cfg.metadata.model_class_name == "AutoModelForCausalLM"
    assert sae.cfg.metadata.hook_name == HF_HOOK
    proxy = load_model("AutoModelForCausalLM", str(hf_folder), device="cpu", hook_names=[HF_HOOK])
    tokens = torch.as_tensor(tiny_dataset[0]["tokens"])[None]
    _, cache = proxy.run_with_cache(tokens, names_filter=[HF_HOOK])
    codes = sae.encode(cache[HF_HOOK])
    assert codes.shape == (1, support.CONTEXT_SIZE, 128)
    assert 0 < (codes > 0).sum(-1).float().mean() <= 64
