"""Feature dashboards for any SAE this plugin exports (and any SAELens SAE), viewable offline.

`make_dashboard(sae_dir, ...)` loads the SAE, a model and tokens, picks features, runs
sae-dashboard's `SaeVisRunner`, and writes

- `feature_dashboard.html`: sae-dashboard's feature-centric view, made self-contained: the d3 v6
  and plotly `<script src=...>` tags that point at web CDNs are replaced by inline copies (plotly
  from the plotly Python package; d3 v6.7.0 from the npm registry, fetched once into the user
  cache by `sae-lens-allocation fetch-assets` or the first `demo`, checksum-verified), so the page
  renders with no network. Without a cached d3 the page keeps sae-dashboard's d3 CDN link (it then
  needs the network to display) and one line on stderr says so;
- `neuronpedia/batch-0.json`: sae-dashboard's `NeuronpediaConverter` output, plus a `metadata`
  object recording the SAE's inference and training architecture (e.g. `jumprelu` trained as
  `mutual_choice`).

The token rows and the choice of latents are in dashboard_inputs.py, the page's offline assets
in dashboard_assets.py, the Neuronpedia JSON in neuronpedia.py and the `dashboard` command's
flags in sae_lens_allocation_cli.

How the sae-dashboard 0.8.0 limitations are handled (without patching it):
- It computes dashboards only for SAELens' TopK, standard, JumpReLU and gated SAEs. Plugin SAEs
  export to `jumprelu` (mutual_choice, feature_choice: calibrated thresholds) or `topk`
  (gradient_topk, topk_aux), so the export is what is loaded; a training checkpoint of a plugin
  architecture is refused with a message naming the export to pass instead.
- It folds the decoder norms into the encoder in place. The dashboard works on its own copy of the
  SAE. Folding is exact for JumpReLU (thresholds scale too), standard, gated and TopK with
  `rescale_acts_by_decoder_norm`; activations are then shown per unit-norm decoder direction, as
  sae-dashboard does. A TopK SAE that selects on raw pre-activations would select differently
  after folding, so it is shown unfolded (`UnfoldedTopKSAE`).
- It feeds the encoder (batch, seq, d) minibatches. Exports select per token (thresholds or
  per-token top-k), so the activations shown do not depend on the minibatch size.
"""

from __future__ import annotations

import html
import json
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.saes.topk_sae import TopK, TopKSAE

from sae_lens_allocation.analysis.dashboard_assets import D3_CDN_NOTE, cached_d3, d3_cache_path, make_offline_html
from sae_lens_allocation.analysis.dashboard_inputs import (
    DEFAULT_MINIBATCH_SIZE_TOKENS,
    DashboardError,
    Progress,
    check_features,
    default_features,
    feature_frequencies,
    load_tokens,
)
from sae_lens_allocation.analysis.neuronpedia import (
    NEURONPEDIA_NAME,
    neuronpedia_batch,
    sae_architecture,
    training_architecture,
)
from sae_lens_allocation.tokens import special_token_ids

HTML_NAME = "feature_dashboard.html"
DEFAULT_CONTEXT_SIZE = 128
# The `dashboard` command shows the same defaults (sae_lens_allocation_cli, which this package
# never imports; tests/test_dashboard.py checks they agree).
DEFAULT_N_TOKENS = 32768
DEFAULT_MINIBATCH_SIZE_FEATURES = 64
DEFAULT_OUT = "out/dashboard"

# Architectures sae-dashboard 0.8.0 computes dashboards for (FeatureMaskingContext, plus TopK).
SUPPORTED_ARCHITECTURES = ("standard", "jumprelu", "gated", "topk")
# SAELens' advice on loading the model from its hub name; resolve_model follows it.
_MODEL_KWARGS_ADVICE = r"\s*This SAE has non-empty model_from_pretrained_kwargs"


@dataclass(frozen=True)
class DashboardResult:
    """What `make_dashboard` wrote.

    html: the self-contained feature-centric dashboard.
    neuronpedia: the Neuronpedia batch JSON, or None when not requested.
    features: the features shown (the page opens on the first).
    skipped: requested features with no example to show (they never fire on the tokens at a
        position sae-dashboard can centre an example on).
    n_prompts, context_size: the token rows the dashboard was computed on.
    d3_inlined: whether d3 is inline (else the page links sae-dashboard's d3 CDN).
    """

    html: Path
    neuronpedia: Path | None
    features: list[int]
    skipped: list[int]
    n_prompts: int
    context_size: int
    d3_inlined: bool


# --------------------------------------------------------------------------------------------
# SAE


class UnfoldedTopKSAE(TopKSAE):
    """A TopK SAE as the dashboard shows it when it selects the top k of the raw pre-activations
    (`rescale_acts_by_decoder_norm=False`): folding the decoder norms into the encoder would change
    which latents are selected, so `fold_W_dec_norm` (called by sae-dashboard) keeps the weights
    and the SAE's own activations are shown."""

    def fold_W_dec_norm(self) -> None:
        return None


def load_dashboard_sae(sae: str | Path | Any, device: str = "cpu") -> Any:
    """An inference SAE the dashboard may modify: loaded from a folder, or a copy of an SAE.

    Plugin training checkpoints are refused (their export needs threshold calibration); SAELens
    training checkpoints are converted with `save_inference_model`. Architectures sae-dashboard
    cannot compute raise `DashboardError`.
    """
    import copy

    from sae_lens_allocation.loading import is_training_checkpoint, load_sae, read_sae_cfg
    from sae_lens_allocation.registration import plugin_architectures

    plugin = plugin_architectures()

    if isinstance(sae, (str, Path)):
        path = Path(sae)
        if not path.is_dir():
            raise FileNotFoundError(f"SAE folder {path} does not exist")
        cfg = read_sae_cfg(path)
        arch = cfg.get("architecture")
        if is_training_checkpoint(cfg) and arch in plugin:
            raise DashboardError(
                f"{path} is a training checkpoint of the {arch} architecture; dashboards are "
                f"computed from the exported SAE (SAELens `jumprelu` or `topk`). Pass the exported "
                f"folder instead: the runner's output_path, or the folder written by "
                f"`sae.save_inference_model(folder)`"
            )
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_MODEL_KWARGS_ADVICE, category=UserWarning)
                loaded = load_sae(path, device=device)
        except ValueError as err:
            raise DashboardError(str(err)) from err
    else:
        loaded = copy.deepcopy(sae).to(device)
    if isinstance(loaded, TrainingSAE):
        if sae_architecture(loaded) in plugin:
            raise DashboardError(
                f"got a {sae_architecture(loaded)} training SAE; dashboards are computed from its "
                f"export: call `sae.save_inference_model(folder)` and pass the folder"
            )
        with tempfile.TemporaryDirectory(prefix="sae-dashboard-") as tmp, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_MODEL_KWARGS_ADVICE, category=UserWarning)
            loaded.save_inference_model(tmp)
            loaded = SAE.load_from_disk(tmp, device=device)
    arch = sae_architecture(loaded)
    if not (isinstance(loaded.activation_fn, TopK) or arch in SUPPORTED_ARCHITECTURES):
        raise DashboardError(
            f"architecture {arch!r} is not supported by sae-dashboard; it computes dashboards for "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} SAEs (plugin SAEs export to jumprelu or topk)"
        )
    if loaded.cfg.metadata.hook_name is None:
        raise DashboardError("the SAE config has no metadata.hook_name: cannot tell where it reads the model")
    if isinstance(loaded, TopKSAE) and not loaded.cfg.rescale_acts_by_decoder_norm:
        unfolded = UnfoldedTopKSAE(loaded.cfg)
        unfolded.load_state_dict(loaded.state_dict())
        loaded = unfolded.to(device)
    if loaded.hook_z_reshaping_mode:
        # sae-dashboard flattens hook_z activations itself and turns this off; so do we.
        loaded.turn_off_forward_pass_hook_z_reshaping()
    loaded.eval()
    return loaded


# --------------------------------------------------------------------------------------------
# Model and tokens


def resolve_model(model: Any, sae: Any, device: str = "cpu") -> Any:
    """The HookedTransformer to read activations from.

    None or "embedded": the plugin's embedded demo model. Another string: a TransformerLens
    model name (SAELens `load_model`, i.e. `HookedTransformer.from_pretrained`, with the SAE's recorded
    `model_from_pretrained_kwargs`). A HookedTransformer is used as it is.
    """
    from transformer_lens import HookedTransformer

    if model is None or isinstance(model, str):
        from sae_lens_allocation.training.sources import EMBEDDED, load_lm

        kwargs = dict(sae.cfg.metadata.model_from_pretrained_kwargs or {})
        return load_lm(model or EMBEDDED, device=device, model_from_pretrained_kwargs=kwargs)
    if not isinstance(model, HookedTransformer):
        raise DashboardError(
            f"model={type(model).__name__} is not allowed; pass None or 'embedded', a "
            "TransformerLens model name, or a HookedTransformer"
        )
    if model.tokenizer is None:
        raise DashboardError("the model has no tokenizer; sae-dashboard decodes tokens with it")
    return model


# --------------------------------------------------------------------------------------------
# sae-dashboard


def compute_vis_data(
    sae: Any,
    model: Any,
    tokens: torch.Tensor,
    features: Sequence[int],
    minibatch_size_tokens: int = DEFAULT_MINIBATCH_SIZE_TOKENS,
    minibatch_size_features: int = DEFAULT_MINIBATCH_SIZE_FEATURES,
    ignore_tokens: Sequence[int] = (),
    seed: int = 0,
    progress: Progress | None = None,
) -> Any:
    """sae-dashboard's `SaeVisData` for `features`, one `SaeVisRunner.run` per feature minibatch
    (as `run` itself loops) so progress is reported per minibatch. `minibatch_size_tokens` is
    sae-dashboard's: the number of token rows per forward pass."""
    from sae_dashboard.sae_vis_data import SaeVisConfig, SaeVisData
    from sae_dashboard.sae_vis_runner import SaeVisRunner

    cfg = SaeVisConfig(
        hook_point=sae.cfg.metadata.hook_name,
        features=list(features),
        minibatch_size_features=minibatch_size_features,
        minibatch_size_tokens=minibatch_size_tokens,
        device=str(sae.device),
        ignore_tokens=set(ignore_tokens),
        seed=seed,
        verbose=False,
    )
    data = SaeVisData(cfg=cfg)
    bar = (progress or Progress(False)).bar(len(cfg.features), "feature panels")
    for start in range(0, len(cfg.features), minibatch_size_features):
        batch = cfg.features[start : start + minibatch_size_features]
        with warnings.catch_warnings():
            # eindex (inside sae-dashboard) trips a torch deprecation warning on every call.
            warnings.filterwarnings("ignore", category=UserWarning, module="eindex")
            part = SaeVisRunner(replace(cfg, features=batch)).run(encoder=sae, model=model, tokens=tokens)
        data.update(part)
        bar.update(len(batch))
    bar.close()
    data.model = model
    data.encoder = sae
    return data


def _header_html(sae: Any, sae_name: str, n_prompts: int, context_size: int, source: str) -> str:
    arch, trained = sae_architecture(sae), training_architecture(sae)
    arch_text = arch if trained == arch else f"{arch} (trained as {trained})"
    e = html.escape
    text = " &middot; ".join(
        [
            f"SAE <b>{e(sae_name)}</b>",
            e(arch_text),
            e(str(sae.cfg.metadata.hook_name)),
            f"d_sae {sae.cfg.d_sae}",
            f"{n_prompts} &times; {context_size} tokens from {e(source)}",
        ]
    )
    return f"<p id='sae-info' style='font-family: system-ui; font-size: 0.9em; color: #444;'>{text}</p>"


# --------------------------------------------------------------------------------------------
# Entry points


def make_dashboard(
    sae_dir: str | Path | Any,
    model: Any = None,
    features: Sequence[int] | None = None,
    n_tokens: int = DEFAULT_N_TOKENS,
    out: str | Path = DEFAULT_OUT,
    dataset: Any = None,
    minibatch_size_tokens: int = DEFAULT_MINIBATCH_SIZE_TOKENS,
    minibatch_size_features: int = DEFAULT_MINIBATCH_SIZE_FEATURES,
    context_size: int | None = None,
    neuronpedia: bool = True,
    progress: bool = True,
    seed: int = 0,
    device: str = "cpu",
) -> DashboardResult:
    """Write a self-contained feature dashboard (and the Neuronpedia JSON) for an SAE.

    sae_dir: an exported SAE folder (any SAELens architecture sae-dashboard computes; plugin
        SAEs export to `jumprelu` or `topk`), a SAELens training checkpoint, or an SAE object
        (copied, never modified).
    model: None or "embedded" (the plugin's embedded model), a TransformerLens model name, or a
        HookedTransformer.
    features: latent indices to show; None picks `default_features` (most active, a random
        sample, the rarest) from the firing frequencies on the same tokens. Requested latents with
        no example to show are skipped (reported in `skipped`).
    n_tokens: tokens to compute on: n_tokens // context_size rows.
    dataset: None for the local corpus' held-out split, else see `load_tokens`.
    minibatch_size_tokens: token rows per forward pass (sae-dashboard's `minibatch_size_tokens`);
        the activations shown do not depend on it.
    context_size: tokens per row; default the SAE's recorded context size, else 128, at most the
        model's n_ctx.
    out: output folder: `feature_dashboard.html` and `neuronpedia/batch-0.json`.

    Without sae-dashboard (the `dashboard` extra) this raises `DashboardError` once the arguments
    and the SAE are checked.
    """
    report = Progress(progress)
    for name, value in (
        ("n_tokens", n_tokens),
        ("minibatch_size_tokens", minibatch_size_tokens),
        ("minibatch_size_features", minibatch_size_features),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DashboardError(f"{name}={value!r} is not allowed; use an int >= 1")
    sae_name = Path(sae_dir).name if isinstance(sae_dir, (str, Path)) else type(sae_dir).__name__
    # Reported once loaded: a folder that cannot be used gives its one error line and nothing else.
    sae = load_dashboard_sae(sae_dir, device=device)
    # Before the model loads: a wrong index needs only the SAE's d_sae to be refused.
    requested = None if features is None else check_features(list(features), sae.cfg.d_sae)
    # After the user's own inputs, so a mistake in them reads the same with or without the extra.
    if find_spec("sae_dashboard") is None:
        raise DashboardError(
            "sae-dashboard is not installed; install the dashboard extra: pip install 'sae-lens-allocation[dashboard]'"
        )
    report(
        f"SAE {sae_dir}: {sae_architecture(sae)} (trained as {training_architecture(sae)}), d_sae {sae.cfg.d_sae}, "
        f"hook {sae.cfg.metadata.hook_name}"
    )
    model_name = "embedded" if model is None else model if isinstance(model, str) else type(model).__name__
    report(f"loading model {model_name}")
    model = resolve_model(model, sae, device=device)

    ctx = context_size or sae.cfg.metadata.context_size or DEFAULT_CONTEXT_SIZE
    ctx = min(int(ctx), model.cfg.n_ctx)
    if ctx < 2:
        raise DashboardError(f"context_size={ctx} is not allowed; use an int >= 2")
    n_prompts = max(1, n_tokens // ctx)
    tokens, source = load_tokens(model, dataset, n_prompts, ctx, seed=seed)
    report(f"tokens: {tokens.shape[0]} rows x {ctx} from {source}")

    # BOS/EOS/PAD positions are left out, as sae-dashboard's Neuronpedia runner does
    # (attention-sink positions dwarf everything).
    ignore = special_token_ids(model)
    freq = feature_frequencies(sae, model, tokens, minibatch_size_tokens, ignore, progress=report)
    n_alive = int((freq > 0).sum())
    report(f"{n_alive} of {sae.cfg.d_sae} latents fire on these tokens")
    if requested is None:
        chosen = default_features(freq, seed=seed)
        skipped: list[int] = []
        if not chosen:
            raise DashboardError("no latent fires on these tokens: nothing to show")
    else:
        chosen = [f for f in requested if freq[f] > 0]
        skipped = [f for f in requested if freq[f] <= 0]
        if skipped:
            report(f"skipping latents with no example on these tokens (never fire): {skipped}")
        if not chosen:
            raise DashboardError(f"none of the requested latents {requested} fires on these tokens")
    report(f"features: {chosen}")

    vis_data = compute_vis_data(
        sae, model, tokens, chosen, minibatch_size_tokens, minibatch_size_features, ignore, seed, report
    )

    from sae_dashboard.data_writing_fns import save_feature_centric_vis

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    html_path = out / HTML_NAME
    report(f"writing {html_path}")
    save_feature_centric_vis(vis_data, html_path)
    title = f"Feature dashboard: {sae_name} ({training_architecture(sae)})"
    header = _header_html(sae, sae_name, tokens.shape[0], ctx, source)
    d3_js = cached_d3()
    if d3_js is None:
        print(f"[dashboard] {D3_CDN_NOTE.format(path=d3_cache_path())}", file=sys.stderr, flush=True)
    page = make_offline_html(html_path.read_text(encoding="utf-8"), title, header, d3_js=d3_js)
    html_path.write_text(page, encoding="utf-8")

    np_path = None
    if neuronpedia:
        np_path = out / NEURONPEDIA_NAME
        report(f"writing {np_path}")
        batch = neuronpedia_batch(
            vis_data,
            model,
            sae,
            sae_set=sae_name,
            n_prompts=tokens.shape[0],
            context_size=ctx,
            dataset_name=source,
            extra_metadata={"sae_path": str(sae_dir)} if isinstance(sae_dir, (str, Path)) else None,
        )
        np_path.parent.mkdir(parents=True, exist_ok=True)
        np_path.write_text(json.dumps(batch), encoding="utf-8")
    return DashboardResult(html_path, np_path, chosen, skipped, tokens.shape[0], ctx, d3_js is not None)
