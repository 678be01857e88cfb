"""Offline assets for sae-dashboard's page: d3 and plotly inlined instead of linked from CDNs.

sae-dashboard 0.8.0's feature-centric page loads d3 v6 and plotly with `<script src>` tags that
point at web CDNs (`D3_CDN_TAG`, `PLOTLY_CDN_TAG`), so it shows nothing offline.
`make_offline_html` replaces them by inline copies: plotly.js from the plotly Python package, and
d3 6.7.0 as npm installs it (the registry tarball, checked against npm's published
`dist.integrity`, and the SHA-256 of its `dist/d3.min.js`), fetched once by `fetch_d3` into the
user cache (`asset_cache_dir`). Nothing is fetched when a page is written or viewed.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import os
import re
from pathlib import Path

D3_CDN_TAG = '<script src="https://d3js.org/d3.v6.min.js"></script>'
PLOTLY_CDN_TAG = '<script src="https://cdn.plot.ly/plotly-latest.min.js"></script>'
# d3 as sae-dashboard's page expects it (v6), from the npm registry: the tarball npm itself would
# install, checked against npm's published `dist.integrity`, and the SHA-256 of its dist/d3.min.js.
D3_VERSION = "6.7.0"
D3_TARBALL_URL = f"https://registry.npmjs.org/d3/-/d3-{D3_VERSION}.tgz"
D3_TARBALL_SHA512 = "hNHRhe+yCDLUG6Q2LwvR/WdNFPOJQ5VWqsJcwIYVeI401+d2/rrCjxSXkiAdIlpx7/73eApFB4Olsmh3YN7a6g=="
D3_JS_MEMBER = "package/dist/d3.min.js"
D3_JS_SHA256 = "fbb8da602a76f4ed49bac3561da62d8149fa121b8fd15685bacc21355d3a3322"
CACHE_ENV = "SAE_LENS_ALLOCATION_CACHE"


def _inline_script(js: str) -> str:
    # "</script" inside the code would end the element early.
    return "<script>\n" + re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE) + "\n</script>"


def asset_cache_dir() -> Path:
    """Where fetched assets live: `$SAE_LENS_ALLOCATION_CACHE`, else
    `$XDG_CACHE_HOME/sae-lens-allocation`, else `~/.cache/sae-lens-allocation`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sae-lens-allocation"


def d3_cache_path() -> Path:
    """Where `fetch_d3` keeps d3's `dist/d3.min.js`."""
    return asset_cache_dir() / f"d3-{D3_VERSION}.min.js"


def cached_d3() -> str | None:
    """The cached d3 v6 source when its SHA-256 is the pinned one, else None (absent or altered)."""
    path = d3_cache_path()
    if not path.is_file():
        return None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != D3_JS_SHA256:
        return None
    return data.decode("utf-8")


def fetch_d3(timeout: float = 30.0) -> Path:
    """Download d3 from the npm registry once into the cache and return its path.

    The tarball must match npm's SHA-512 integrity and its `dist/d3.min.js` the pinned SHA-256;
    anything else raises `OSError` and leaves the cache as it was. A valid cached copy is kept."""
    import tarfile
    import urllib.request

    path = d3_cache_path()
    if cached_d3() is not None:
        return path
    with urllib.request.urlopen(D3_TARBALL_URL, timeout=timeout) as response:
        tarball = response.read()
    digest = base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    if digest != D3_TARBALL_SHA512:
        raise OSError(f"{D3_TARBALL_URL} does not match npm's integrity sha512-{D3_TARBALL_SHA512}")
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        member = archive.extractfile(D3_JS_MEMBER)
        if member is None:
            raise OSError(f"{D3_TARBALL_URL} has no regular file {D3_JS_MEMBER}")
        js = member.read()
    if hashlib.sha256(js).hexdigest() != D3_JS_SHA256:
        raise OSError(f"{D3_JS_MEMBER} in {D3_TARBALL_URL} does not have SHA-256 {D3_JS_SHA256}")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(js)
    partial.replace(path)
    return path


D3_CDN_NOTE = (
    "d3 is not in the cache ({path}), so the page loads d3 from its CDN and needs the network to "
    "display; `sae-lens-allocation fetch-assets` fetches it once for offline pages"
)


def make_offline_html(page: str, title: str, header_html: str = "", d3_js: str | None = None) -> str:
    """sae-dashboard's page made self-contained: its plotly CDN `<script src>` tag is replaced by
    an inline copy from the plotly package, and its d3 v6 tag by `d3_js` (kept as the CDN link
    when None); it is wrapped in a full HTML document with a UTF-8 charset (the tokens shown are
    not ASCII) and `header_html` above the panels. Any other remote resource is refused."""
    from plotly.offline import get_plotlyjs

    for tag in (D3_CDN_TAG, PLOTLY_CDN_TAG):
        if tag not in page:
            raise RuntimeError(f"sae-dashboard's HTML no longer contains {tag}; cannot make it offline")
    page = page.replace(PLOTLY_CDN_TAG, _inline_script(get_plotlyjs()), 1)
    if d3_js is not None:
        page = page.replace(D3_CDN_TAG, _inline_script(d3_js), 1)
    others = page.replace(D3_CDN_TAG, "")
    remote = re.search(r"<(script|link)\b[^>]*\b(src|href)\s*=\s*[\"']?(https?:)?//", others, flags=re.IGNORECASE)
    if remote:
        raise RuntimeError(f"sae-dashboard's HTML loads another remote resource: {remote.group(0)!r}")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n</head>\n<body>\n{header_html}\n{page}\n</body>\n</html>\n"
    )

