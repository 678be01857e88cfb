"""Feature dashboards: plugin exports and SAELens SAEs load, the page is self-contained and renders
in headless Chromium with the network off, the Neuronpedia JSON records the architecture, and the
activations shown do not depend on the minibatch size."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip(
    "sae_dashboard",
    reason="sae-dashboard is not installed: dashboards need the `dashboard` extra "
    "(pip install 'sae-lens-allocation[dashboard]')",
)

from sae_dashboard.data_writing_fns import save_feature_centric_vis
from sae_dashboard.utils_fns import get_decode_html_safe_fn
from sae_lens import SAE, TrainingSAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

from sae_lens_allocation.analysis import dashboard, dashboard_assets
from sae_lens_allocation.analysis.dashboard import (
    DashboardError,
    compute_vis_data,
    default_features,
    feature_frequencies,
    load_dashboard_sae,
    make_dashboard,
)
from sae_lens_allocation.analysis.dashboard_assets import make_offline_html
from sae_lens_allocation.cli import run
from sae_lens_allocation.tokens import special_token_ids
from sae_lens_allocation_cli import build_parser, main

import support

PLUGIN_EXPORTS = ["mutual_choice", "feature_choice", "gradient_topk"]
N_TOKENS = 64 * support.CONTEXT_SIZE


# --------------------------------------------------------------------------------------------
# SAEs under test


def _save_builtin(kind: str, folder: Path) -> Path:
    """A random-weight SAELens SAE on the tiny model's hook, saved as SAELens saves it."""
    torch.manual_seed(0)
    if kind == "topk":
        # Default TopK config: top-k of the raw pre-activations (no decoder-norm rescaling).
        cfg = TopKSAEConfig(d_in=support.D_MODEL, d_sae=128, k=8)
        sae: SAE[Any] = TopKSAE(cfg)
    else:
        cfg = JumpReLUSAEConfig(d_in=support.D_MODEL, d_sae=128)
        sae = JumpReLUSAE(cfg)
        with torch.no_grad():
            sae.threshold.fill_(0.5)
    with torch.no_grad():
        # Unequal decoder norms: folding them would be visible in the activations shown.
        sae.W_dec.mul_(torch.rand(cfg.d_sae, 1) * 2 + 0.5)
    cfg.metadata.hook_name = support.HOOK_NAME
    cfg.metadata.model_name = "tiny-offline"
    cfg.metadata.context_size = support.CONTEXT_SIZE
    sae.save_model(folder)
    return folder


class _Cache(dict):
    """Builds an entry on first use, so one SAE kind failing to build fails only its own tests."""

    def __init__(self, build: Any) -> None:
        super().__init__()
        self.build = build

    def __missing__(self, kind: str) -> Any:
        self[kind] = value = self.build(kind)
        return value


@pytest.fixture(scope="session")
def sae_dirs(tmp_path_factory, request) -> dict[str, Path]:
    """Built-in SAEs saved here; plugin exports from the session's `plugin_exports`."""
    root = tmp_path_factory.mktemp("dashboard-saes")
    return _Cache(lambda kind: _save_builtin(kind, root / kind) if kind in ("topk", "jumprelu")
                  else request.getfixturevalue("plugin_exports")[kind][0])


@pytest.fixture(scope="session")
def dashboards(sae_dirs, tmp_path_factory) -> dict[str, dashboard.DashboardResult]:
    """One dashboard per SAE, with the default feature selection, on rows drawn with another seed
    than the training rows."""
    model = support.tiny_model()
    rows = support.tiny_dataset(n_rows=64, seed=1)
    root = tmp_path_factory.mktemp("dashboards")
    return _Cache(
        lambda kind: make_dashboard(
            sae_dirs[kind],
            model=model,
            dataset=rows,
            n_tokens=N_TOKENS,
            out=root / kind,
            minibatch_size_tokens=16,
            progress=False,
        )
    )


# --------------------------------------------------------------------------------------------
# Feature selection


def test_default_features_takes_most_active_random_and_rarest_but_never_dead():
    freq = torch.tensor([0.0, 0.5, 0.1, 0.02, 0.3, 0.0, 0.01, 0.2, 0.05, 0.4])
    chosen = default_features(freq, n_most_active=3, n_random=2, n_rarest=2, seed=0)
    assert chosen[:3] == [1, 9, 4]  # most frequent first
    assert chosen[-2:] == [6, 3]  # rarest live latents, rarest first
    assert len(chosen) == 7 and len(set(chosen)) == 7
    assert set(chosen[3:5]) <= {2, 7, 8}  # the random part comes from the middle
    assert 0 not in chosen and 5 not in chosen
    assert default_features(freq, 3, 2, 2, seed=0) == chosen  # seeded
    draws = {tuple(default_features(freq, 3, 2, 2, seed=s)[3:5]) for s in range(20)}
    assert len(draws) > 1


def test_default_features_with_few_live_latents_returns_all_of_them():
    freq = torch.tensor([0.0, 0.2, 0.0, 0.1])
    assert default_features(freq, n_most_active=8, n_random=8, n_rarest=4) == [1, 3]
    assert default_features(torch.zeros(5)) == []


def test_tokens_from_text_and_from_pretokenized_rows_of_other_lengths():
    from datasets import Dataset

    model = support.tiny_model()
    bos = model.tokenizer.bos_token_id
    text = Dataset.from_dict({"text": ["def f(x):\n    return x + 1\n" * 20] * 6})
    tokens, source = dashboard.load_tokens(model, text, n_prompts=5, context_size=16)
    assert tokens.shape == (5, 16) and (tokens[:, 0] == bos).all() and "Dataset" in source
    ids = model.tokenizer("def f(x):\n    return x + 1\n" * 20, add_special_tokens=False)["input_ids"]
    assert tokens[0, 1:].tolist() == ids[:15]  # [BOS] + 15 stream tokens per row
    rows = Dataset.from_dict({"input_ids": [list(range(10)), list(range(10, 30))]})
    tokens, _ = dashboard.load_tokens(model, rows, n_prompts=4, context_size=8)
    assert tokens.tolist() == [list(range(8)), list(range(8, 16)), list(range(16, 24))]
    with pytest.raises(DashboardError, match="'tokens' or 'input_ids' column"):
        dashboard.load_tokens(model, Dataset.from_dict({"other": [1]}), n_prompts=1, context_size=8)


# --------------------------------------------------------------------------------------------
# Offline HTML


def test_offline_html_inlines_d3_and_plotly_and_refuses_unknown_remote_scripts():
    page = f"<div>x</div>\n{dashboard_assets.D3_CDN_TAG}\n{dashboard_assets.PLOTLY_CDN_TAG}\n<script>go()</script>"
    out = make_offline_html(page, title="t <1>", d3_js="// https://d3js.org v6.7.0 </script>")
    assert "https://" not in out.split("<body>")[1].split("<script>")[0]
    assert dashboard_assets.D3_CDN_TAG not in out and dashboard_assets.PLOTLY_CDN_TAG not in out
    assert "d3js.org v6.7.0 <\\/script>" in out and "plotly.js v" in out
    assert out.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in out
    assert "<title>t &lt;1&gt;</title>" in out
    with pytest.raises(RuntimeError, match="no longer contains"):
        make_offline_html("<div>no scripts</div>", title="t")
    with pytest.raises(RuntimeError, match="another remote resource"):
        make_offline_html(page + '<script src="https://example.com/x.js"></script>', title="t")


def test_without_d3_the_page_keeps_only_the_d3_cdn_link():
    page = f"<div>x</div>\n{dashboard_assets.D3_CDN_TAG}\n{dashboard_assets.PLOTLY_CDN_TAG}\n<script>go()</script>"
    out = make_offline_html(page, title="t", d3_js=None)
    assert dashboard_assets.D3_CDN_TAG in out and dashboard_assets.PLOTLY_CDN_TAG not in out and "plotly.js v" in out
    with pytest.raises(RuntimeError, match="another remote resource"):
        make_offline_html(page + '<link href="//example.com/x.css">', title="t", d3_js=None)


def test_without_cached_d3_the_dashboard_links_the_cdn_and_says_so(monkeypatch, tmp_path, sae_dirs, capsys):
    monkeypatch.setenv(dashboard_assets.CACHE_ENV, str(tmp_path / "empty-cache"))
    result = make_dashboard(
        sae_dirs["jumprelu"], model=support.tiny_model(), dataset=support.tiny_dataset(n_rows=16, seed=1),
        n_tokens=16 * support.CONTEXT_SIZE, features=[0, 1, 2, 3], out=tmp_path / "dash",
        neuronpedia=False, progress=False,
    )
    page = result.html.read_text(encoding="utf-8")
    assert not result.d3_inlined and dashboard_assets.D3_CDN_TAG in page and "plotly.js v" in page
    notes = [line for line in capsys.readouterr().err.splitlines() if "d3" in line]
    assert len(notes) == 1 and "fetch-assets" in notes[0], notes


# --------------------------------------------------------------------------------------------
# Dashboards for every SAE kind


@pytest.mark.parametrize("kind", ["topk", "jumprelu", *PLUGIN_EXPORTS])
def test_dashboard_is_self_contained_and_neuronpedia_json_records_the_architecture(kind, dashboards):
    result = dashboards[kind]
    page = result.html.read_text(encoding="utf-8")
    assert "plotly.js v" in page
    if result.d3_inlined:
        assert not re.search(r"<(script|link)\b[^>]*\b(src|href)\s*=", page), "page loads an external resource"
        assert "d3js.org v6.7.0" in page
    else:  # no cached d3: the d3 CDN link is the page's only remote resource
        remote = re.findall(r"<(?:script|link)\b[^>]*\b(?:src|href)\s*=[^>]*>", page)
        assert remote == [dashboard_assets.D3_CDN_TAG[:-9]]
    assert len(result.features) == 8 + 8 + 4  # the default selection, not range(d_sae)
    batch = json.loads(result.neuronpedia.read_text())
    assert [f["feature_index"] for f in batch["features"]] == result.features
    assert batch["metadata"]["training_architecture"] == kind
    assert batch["metadata"]["architecture"] == support.EXPORT_ARCHITECTURE.get(kind, kind)
    assert batch["metadata"]["hook_name"] == support.HOOK_NAME
    for feature in batch["features"]:
        assert feature["frac_nonzero"] > 0
        assert feature["activations"], f"feature {feature['feature_index']} has no example sequences"
        top = feature["activations"][0]
        assert len(top["tokens"]) == len(top["values"]) and max(top["values"]) > 0


def test_default_selection_is_most_active_then_random_then_rarest(sae_dirs, dashboards):
    result = dashboards["mutual_choice"]
    sae = load_dashboard_sae(sae_dirs["mutual_choice"])
    model = support.tiny_model()
    tokens = torch.tensor(support.tiny_dataset(n_rows=64, seed=1)["tokens"])
    freq = feature_frequencies(sae, model, tokens, ignore_tokens=special_token_ids(model))
    assert result.features == default_features(freq, seed=0)
    live = freq > 0
    assert freq[result.features[0]] == freq[live].max()
    assert freq[result.features[-4]] == freq[live].min()


def test_topk_without_decoder_norm_rescaling_shows_its_own_activations(sae_dirs, tmp_path):
    """sae-dashboard folds decoder norms into the encoder, which changes a raw-pre-activation
    TopK's selection; the dashboard must show the SAE's own activations instead."""
    model = support.tiny_model()
    rows = support.tiny_dataset(n_rows=64, seed=1)
    sae = SAE.load_from_disk(sae_dirs["topk"])
    tokens = torch.tensor(rows["tokens"])
    _, cache = model.run_with_cache(tokens, names_filter=support.HOOK_NAME, stop_at_layer=1)
    acts = sae.encode(cache[support.HOOK_NAME]).detach()
    acts = acts * (tokens != model.tokenizer.bos_token_id).unsqueeze(-1)
    features = [0, 1, 2]
    result = make_dashboard(sae_dirs["topk"], model=model, dataset=rows, n_tokens=N_TOKENS, features=features,
                            out=tmp_path, progress=False)
    batch = json.loads(result.neuronpedia.read_text())
    # The top-activations group's title, "MAX = ...", is the largest activation shown.
    shown = {f["feature_index"]: next(a["bin_max"] for a in f["activations"] if a["bin_min"] == -1)
             for f in batch["features"]}
    for j in result.features:
        assert shown[j] == pytest.approx(float(acts[..., j].max()), abs=2e-3)


def test_mutual_choice_activations_do_not_depend_on_minibatch_size(sae_dirs, dashboards):
    """sae-dashboard feeds the encoder (batch, seq, d) minibatches; the exported Mutual Choice SAE
    (jumprelu, calibrated threshold) gives the same activations whatever their size."""
    model = support.tiny_model()
    tokens = torch.tensor(support.tiny_dataset(n_rows=64, seed=1)["tokens"])
    features = dashboards["mutual_choice"].features[:6]
    ignore = special_token_ids(model)

    def vis(minibatch_size_tokens: int) -> Any:
        sae = load_dashboard_sae(sae_dirs["mutual_choice"])
        return compute_vis_data(sae, model, tokens, features, minibatch_size_tokens, ignore_tokens=ignore)

    one, many = vis(3), vis(len(tokens))
    for j in features:
        a, b = one.feature_data_dict[j], many.feature_data_dict[j]
        assert a.acts_histogram_data.title == b.acts_histogram_data.title  # density
        assert a.acts_histogram_data.bar_heights == b.acts_histogram_data.bar_heights
        groups_a, groups_b = a.sequence_data.seq_group_data, b.sequence_data.seq_group_data
        assert [g.title for g in groups_a] == [g.title for g in groups_b]
        seqs_a = [s for g in groups_a for s in g.seq_data]
        seqs_b = [s for g in groups_b for s in g.seq_data]
        assert [s.token_ids for s in seqs_a] == [s.token_ids for s in seqs_b]
        torch.testing.assert_close(
            torch.tensor([v for s in seqs_a for v in s.feat_acts]),
            torch.tensor([v for s in seqs_b for v in s.feat_acts]),
            rtol=0,
            atol=1e-5,
        )
        assert max(v for s in seqs_a for v in s.feat_acts) > 0


# --------------------------------------------------------------------------------------------
# Errors


def test_plugin_training_checkpoint_is_refused_naming_the_export(tmp_path):
    sae = TrainingSAE.from_dict({"architecture": "mutual_choice", "d_in": support.D_MODEL, "d_sae": 64, "k": 4})
    sae.save_model(tmp_path)
    with pytest.raises(DashboardError, match="training checkpoint of the mutual_choice architecture.*exported folder"):
        load_dashboard_sae(tmp_path)


def test_architecture_sae_dashboard_cannot_compute_is_refused_naming_the_supported_ones(tmp_path):
    from sae_lens.saes.matching_pursuit_sae import MatchingPursuitSAE, MatchingPursuitSAEConfig

    cfg = MatchingPursuitSAEConfig(d_in=support.D_MODEL, d_sae=64)
    cfg.metadata.hook_name = support.HOOK_NAME
    MatchingPursuitSAE(cfg).save_model(tmp_path)
    with pytest.raises(DashboardError, match="'matching_pursuit' is not supported by sae-dashboard.*jumprelu"):
        load_dashboard_sae(tmp_path)


def test_saelens_training_checkpoint_is_converted_to_its_inference_sae(tmp_path):
    sae = TrainingSAE.from_dict({"architecture": "topk", "d_in": support.D_MODEL, "d_sae": 64, "k": 4})
    sae.cfg.metadata.hook_name = support.HOOK_NAME
    sae.save_model(tmp_path)
    loaded = load_dashboard_sae(tmp_path)
    assert not isinstance(loaded, TrainingSAE) and loaded.cfg.architecture() == "topk"
    x = torch.randn(3, 5, support.D_MODEL)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)), rtol=1e-4, atol=1e-5)


def test_model_of_the_wrong_width_is_a_clear_error(sae_dirs, tmp_path):
    model = support.tiny_model()
    sae = SAE.load_from_disk(sae_dirs["jumprelu"])
    wide = JumpReLUSAE(JumpReLUSAEConfig(d_in=2 * support.D_MODEL, d_sae=16))
    wide.cfg.metadata.hook_name = support.HOOK_NAME
    wide.cfg.metadata.model_name = "gpt2"
    with pytest.raises(DashboardError, match=r"width 32 but the SAE has d_in=64.*'gpt2'"):
        make_dashboard(wide, model=model, dataset=support.tiny_dataset(8), n_tokens=256, out=tmp_path, progress=False)
    with pytest.raises(DashboardError, match=r"features are ints in \[0, 128\)"):
        make_dashboard(sae, model=model, dataset=support.tiny_dataset(8), n_tokens=256, features=[128],
                       out=tmp_path, progress=False)


def test_requested_latents_that_never_fire_are_skipped(sae_dirs, tmp_path):
    sae = SAE.load_from_disk(sae_dirs["jumprelu"])
    with torch.no_grad():
        sae.threshold[5] = 1e6
    result = make_dashboard(sae, model=support.tiny_model(), dataset=support.tiny_dataset(8), n_tokens=256,
                            features=[4, 5], out=tmp_path, neuronpedia=False, progress=False)
    assert result.features == [4] and result.skipped == [5] and result.neuronpedia is None
    assert float(sae.threshold[5]) == 1e6  # the caller's SAE is not modified (nor folded)


def test_command_writes_the_dashboard_and_prints_its_paths(sae_dirs, tmp_path, capsys):
    args = build_parser().parse_args(["dashboard", str(sae_dirs["jumprelu"]), "--features", "3", "7",
                                      "--n-tokens", "512", "--out", str(tmp_path),
                                      "--minibatch-size-tokens", "4", "--seed", "1"])
    # The command line names models; the tiny test model and its rows are passed as objects.
    args.model, args.dataset = support.tiny_model(), support.tiny_dataset(16)
    assert run(args) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        f"dashboard: {(tmp_path / 'feature_dashboard.html').resolve()}",
        f"neuronpedia json: {(tmp_path / 'neuronpedia' / 'batch-0.json').resolve()}",
    ]
    assert "[dashboard] features: [3, 7]" in captured.err  # progress is reported
    batch = json.loads((tmp_path / "neuronpedia" / "batch-0.json").read_text())
    assert [f["feature_index"] for f in batch["features"]] == [3, 7]


def test_command_reports_user_errors_in_one_line(tmp_path, capsys):
    sae = TrainingSAE.from_dict({"architecture": "feature_choice", "d_in": support.D_MODEL, "d_sae": 64, "k": 4})
    sae.save_model(tmp_path / "ckpt")
    for argv in ([str(tmp_path / "ckpt")], [str(tmp_path / "missing")]):
        assert main(["dashboard", *argv, "--out", str(tmp_path / "out"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("sae-lens-allocation: error:") and "\n" not in err


# --------------------------------------------------------------------------------------------
# Headless Chromium, network off


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--mute-audio",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
    # No network: every request goes to a dead proxy, no name resolves.
    "--proxy-server=127.0.0.1:9",
    "--proxy-bypass-list=<-loopback>",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--remote-debugging-port=0",
]


class Chromium:
    """Headless Chromium driven over the DevTools protocol (websocket-client), one page."""

    def __init__(self, workdir: Path) -> None:
        import websocket

        profile = workdir / "profile"
        self.log = open(workdir / "chromium.log", "w")
        self.proc = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.is_file() or len(port_file.read_text().split()) < 2:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start: {(workdir / 'chromium.log').read_text()[-2000:]}")
            time.sleep(0.1)
        port, path = port_file.read_text().split()[:2]
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=60, suppress_origin=True)
        self.events: list[dict[str, Any]] = []
        self._id = 0
        self.session: str | None = None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.call(f"{domain}.enable")
        self.call("Network.emulateNetworkConditions", offline=True, latency=0, downloadThroughput=-1,
                  uploadThroughput=-1)
        self.call("Emulation.setDeviceMetricsOverride", width=1600, height=1000, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def open(self, path: Path) -> None:
        self.call("Page.navigate", url=path.resolve().as_uri())
        deadline = time.monotonic() + 60
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} did not load")
            self.events.append(json.loads(self.ws.recv()))

    def evaluate(self, expression: str) -> Any:
        reply = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"page script failed: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def errors(self) -> list[str]:
        """Uncaught exceptions, console.error/assert calls and error log entries."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(details.get("exception", {}).get("description") or details.get("text", ""))
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(params["entry"]["text"])
        return found

    def requested_urls(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def browser(tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip(
            f"headless Chromium not found at {CHROMIUM}: `make env` installs Debian's chromium package "
            "when it runs as root; it could not be installed here"
        )
    if dashboard_assets.cached_d3() is None:
        pytest.skip(
            f"d3 is not in the cache ({dashboard_assets.d3_cache_path()}): `sae-lens-allocation fetch-assets` "
            "fetches it once (`make env` does)"
        )
    chromium = Chromium(tmp_path)
    yield chromium
    chromium.close()


# Visit every feature in the dropdown and report what rendered.
PANELS_JS = r"""
(() => {
  const select = document.getElementById('select-0');
  const keys = Array.from(select.options).map(o => o.value);
  const panels = [];
  for (const key of keys) {
    select.value = key;
    select.dispatchEvent(new Event('change'));
    const hist = document.getElementById('histogram-acts-0');
    const title = hist.previousSibling && hist.previousSibling.tagName === 'H4' ? hist.previousSibling.textContent : '';
    const groups = Array.from(document.querySelectorAll('.seq-group'));
    const top = groups.find(g => g.querySelector('h4').textContent.startsWith('TOP ACTIVATIONS'));
    const firstSeq = top ? top.querySelector('.seq') : null;
    const tokens = firstSeq ? Array.from(firstSeq.querySelectorAll('.hover-text')).map(span => {
      const tip = span.nextElementSibling;
      const cell = tip ? tip.querySelector('td.left-aligned') : null;
      const id = cell ? cell.textContent.match(/\((\d+)\)\s*$/) : null;
      return [span.textContent, id ? Number(id[1]) : null];
    }) : [];
    panels.push({
      key: key,
      histTitle: title,
      histBars: hist.querySelectorAll('.trace.bars .point path').length,
      topTitle: top ? top.querySelector('h4').textContent : '',
      tokens: tokens,
    });
  }
  return panels;
})()
"""


@pytest.mark.slow
def test_dashboard_renders_offline_in_headless_chromium(browser, dashboards, tmp_path):
    result = dashboards["mutual_choice"]
    browser.open(result.html)
    panels = browser.evaluate(PANELS_JS)
    first = json.dumps(str(result.features[0]))
    browser.evaluate(f"const s = document.getElementById('select-0'); s.value = {first}; "
                     "s.dispatchEvent(new Event('change'));")
    shot = tmp_path / "dashboard.png"
    browser.screenshot(shot)
    print(f"screenshot: {shot}")

    assert browser.errors() == []
    assert all(url.startswith("file://") for url in browser.requested_urls()), browser.requested_urls()
    assert sorted(int(p["key"]) for p in panels) == sorted(result.features)
    decode = get_decode_html_safe_fn(support.tiny_tokenizer(), html=True)
    for panel in panels:
        assert panel["histTitle"].startswith("ACTIVATIONSDENSITY = "), panel
        assert panel["histBars"] > 0, panel
        assert panel["topTitle"].startswith("TOP ACTIVATIONSMAX = "), panel
        assert float(panel["topTitle"].split("= ")[1]) > 0, panel
        assert panel["tokens"], panel
        for text, token_id in panel["tokens"]:
            # sae-dashboard escapes a backslash twice in its data and the page shows it once.
            expected = html.unescape(decode(token_id)).replace("\xa0", " ").replace("\\\\", "\\")
            assert token_id is not None and text.replace("\xa0", " ") == expected, (text, token_id)
    assert shot.stat().st_size > 20_000


def test_plain_sae_dashboard_page_fails_offline_in_the_same_browser(browser, sae_dirs, tmp_path):
    """The check above can fail: sae-dashboard's own page (CDN scripts) logs errors offline."""
    model = support.tiny_model()
    sae = load_dashboard_sae(sae_dirs["mutual_choice"])
    tokens = torch.tensor(support.tiny_dataset(n_rows=8, seed=1)["tokens"])
    vis = compute_vis_data(sae, model, tokens, [0, 1])
    save_feature_centric_vis(vis, tmp_path / "plain.html")
    browser.open(tmp_path / "plain.html")
    errors = browser.errors()
    assert any("d3 is not defined" in e for e in errors), errors
    assert any(url.startswith("https://d3js.org/") for url in browser.requested_urls())


def test_the_command_shows_the_dashboard_defaults():
    """The console script (which never imports the package) and `make_dashboard` agree."""
    import sae_lens_allocation_cli as entry

    for name in ("DEFAULT_N_TOKENS", "DEFAULT_MINIBATCH_SIZE_TOKENS", "DEFAULT_MINIBATCH_SIZE_FEATURES", "DEFAULT_OUT"):
        assert getattr(entry, name) == getattr(dashboard, name), name
    from sae_lens_allocation import cli

    assert cli.PROG == entry.PROG
