"""A page template for `dvc plots show` that needs no network.

DVC's own page loads vega, vega-lite and vega-embed from a CDN: offline, its vega plots stay
blank. This template holds the three scripts inline (the versions DVC's page asks for), so the
page it renders draws every plot anywhere. The scripts come from the npm registry, each
tarball checked against its published sha512 integrity; `make install` writes the template
to `.dvc/offline-plots.html` and names it as `plots.html_template` in `.dvc/config.local`.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import PipelineError
from .io import write_text

REGISTRY = "https://registry.npmjs.org"


@dataclass(frozen=True)
class Script:
    package: str
    version: str
    member: str  # the minified build inside the package
    integrity: str  # the registry's dist.integrity of the tarball

    @property
    def tarball(self) -> str:
        return f"{self.package}/-/{self.package}-{self.version}.tgz"


SCRIPTS = (
    Script("vega", "5.20.2", "build/vega.min.js",
           "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw=="),
    Script("vega-lite", "5.2.0", "build/vega-lite.min.js",
           "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw=="),
    Script("vega-embed", "6.18.2", "build/vega-embed.min.js",
           "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg=="),
)

PAGE = """<!DOCTYPE html>
<html>
<head>
    <!-- {versions}: inline, so that the page needs no network -->
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


class PlotsPageError(PipelineError):
    """The scripts could not be fetched or did not match their checksums."""


def check_integrity(data: bytes, integrity: str) -> None:
    algorithm, _, expected = integrity.partition("-")
    actual = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    if actual != expected:
        raise PlotsPageError(f"checksum mismatch: expected {integrity}, got {algorithm}-{actual}")


def script_text(tarball: bytes, script: Script) -> str:
    """The script's minified build, read from its package tarball once the tarball's checksum
    matches."""
    check_integrity(tarball, script.integrity)
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        try:
            text = archive.extractfile(f"package/{script.member}").read().decode()
        except (KeyError, AttributeError):  # absent, or not a file
            raise PlotsPageError(f"{script.package}: no {script.member} in its package") from None
    if "</script" in text.lower():
        raise PlotsPageError(f"{script.package}: cannot be inlined (contains </script)")
    return text


def page(texts: dict[Script, str]) -> str:
    """The template: the scripts inline, DVC's `{plot_divs}` and `{refresh_tag}` left for it."""
    scripts = "\n".join(f'    <script type="text/javascript">\n{text}\n    </script>'
                        for text in texts.values())
    versions = ", ".join(f"{s.package} {s.version}" for s in texts)
    return PAGE.format(versions=versions, scripts=scripts, refresh_tag="{refresh_tag}")


def fetch(script: Script, registry: str = REGISTRY, timeout: float = 60) -> bytes:
    url = f"{registry.rstrip('/')}/{script.tarball}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise PlotsPageError(f"cannot fetch {url}: {exc}") from None


def write_page(path: Path, registry: str = REGISTRY) -> Path:
    """Fetch, check and inline the scripts into the template at `path` (written whole, or not
    at all)."""
    texts = {script: script_text(fetch(script, registry), script) for script in SCRIPTS}
    write_text(path, page(texts))
    return path
