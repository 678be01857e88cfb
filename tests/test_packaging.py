"""What a pip install needs beside the code: the packaged configs (`init`) and d3 for offline
dashboards (`fetch-assets`: fetched once from the npm registry, checksum-verified, cached)."""

import base64
import hashlib
import io
import tarfile
import urllib.error
import urllib.request

import pytest

from sae_lens_allocation.analysis import dashboard_assets
from sae_lens_allocation.yaml_config import load_runner_config
from sae_lens_allocation_cli import configs_dir, main, packaged_configs


def test_init_lists_the_packaged_configs_each_with_what_it_is_for(capsys):
    assert main(["init"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == packaged_configs() == sorted(p.stem for p in configs_dir().glob("*.yaml"))
    assert {"gpt2-small-mutual-choice", "embedded-mutual-choice", "compare-embedded"} <= set(names)
    for name, line in zip(names, lines):
        first = (configs_dir() / f"{name}.yaml").read_text().splitlines()[0]
        # The first line of each config is one self-contained sentence saying what it is for.
        assert first.startswith("# ") and first.endswith(".") and first.count("(") == first.count(")"), name
        assert line.split(None, 1)[1] == first[2:]


def test_init_writes_a_config_that_loads_from_the_current_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["init", "embedded-mutual-choice"]) == 0
    assert "embedded-mutual-choice.yaml" in capsys.readouterr().out
    cfg = load_runner_config("embedded-mutual-choice.yaml", ["training_tokens=4096"])
    assert cfg.sae.architecture() == "mutual_choice" and cfg.model_name == "embedded"


def test_init_refuses_to_overwrite_and_unknown_names(capsys, tmp_path):
    target = tmp_path / "gpt2-small-gradient-topk.yaml"
    target.write_text("mine\n")
    assert main(["init", "gpt2-small-gradient-topk", "--dir", str(tmp_path)]) == 2
    assert "--force" in capsys.readouterr().err and target.read_text() == "mine\n"
    assert main(["init", "gpt2-small-gradient-topk", "--dir", str(tmp_path), "--force"]) == 0
    assert "architecture: gradient_topk" in target.read_text()
    assert main(["init", "gpt2-small-mutal-choice"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "gpt2-small-mutual-choice" in err


def _fake_d3_tarball(js: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        info = tarfile.TarInfo(dashboard_assets.D3_JS_MEMBER)
        info.size = len(js)
        archive.addfile(info, io.BytesIO(js))
    return buf.getvalue()


@pytest.fixture
def fake_registry(monkeypatch, tmp_path):
    """An empty asset cache and an npm registry serving a small d3 tarball whose checksums are
    the pinned ones; returns the served bytes (a test may alter them)."""
    js = b"// https://d3js.org v6.7.0 (test stand-in)\nwindow.d3 = {};\n"
    served = {"tarball": _fake_d3_tarball(js)}
    monkeypatch.setenv(dashboard_assets.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(dashboard_assets, "D3_JS_SHA256", hashlib.sha256(js).hexdigest())
    monkeypatch.setattr(
        dashboard_assets, "D3_TARBALL_SHA512", base64.b64encode(hashlib.sha512(served["tarball"]).digest()).decode()
    )
    urls: list[str] = []

    def urlopen(url, timeout):
        urls.append(url)
        return io.BytesIO(served["tarball"])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    served["urls"] = urls
    served["js"] = js
    return served


def test_fetch_d3_verifies_caches_once_and_the_cache_is_checked_on_read(fake_registry):
    assert dashboard_assets.cached_d3() is None
    path = dashboard_assets.fetch_d3()
    assert path == dashboard_assets.d3_cache_path() and path.read_bytes() == fake_registry["js"]
    assert dashboard_assets.cached_d3() == fake_registry["js"].decode()
    dashboard_assets.fetch_d3()
    assert fake_registry["urls"] == [dashboard_assets.D3_TARBALL_URL]  # fetched once
    path.write_bytes(fake_registry["js"] + b"altered")
    assert dashboard_assets.cached_d3() is None


def test_fetch_d3_refuses_a_tarball_that_fails_the_checksum(fake_registry):
    fake_registry["tarball"] = _fake_d3_tarball(fake_registry["js"] + b"x")
    with pytest.raises(OSError, match="integrity"):
        dashboard_assets.fetch_d3()
    assert not dashboard_assets.d3_cache_path().exists()


def test_fetch_assets_command_says_where_or_why_not(fake_registry, capsys, monkeypatch):
    assert main(["fetch-assets"]) == 0
    assert str(dashboard_assets.d3_cache_path()) in capsys.readouterr().out

    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    dashboard_assets.d3_cache_path().unlink()
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert main(["fetch-assets"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no network" in err
