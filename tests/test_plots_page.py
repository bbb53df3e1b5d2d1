"""The offline `dvc plots show` template (plots_page), without the network: checksums, the
script taken from its package, the placeholders DVC fills."""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile

import pytest

from mnist_pipeline.plots_page import (
    SCRIPTS,
    PlotsPageError,
    Script,
    check_integrity,
    page,
    script_text,
)


def _tarball(files: dict[str, str]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _script(tarball: bytes) -> Script:
    digest = base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    return Script("vega", "0.0.1", "build/vega.min.js", f"sha512-{digest}")


def test_the_script_is_read_from_a_checked_tarball():
    tarball = _tarball({"build/vega.min.js": "var vega = {};", "README.md": "x"})
    assert script_text(tarball, _script(tarball)) == "var vega = {};"


def test_a_tarball_that_does_not_match_its_checksum_is_refused():
    tarball = _tarball({"build/vega.min.js": "var vega = {};"})
    script = _script(tarball)
    with pytest.raises(PlotsPageError, match="checksum mismatch"):
        script_text(tarball + b"\0", script)
    with pytest.raises(PlotsPageError, match="checksum mismatch"):
        check_integrity(b"other", script.integrity)


def test_a_script_that_would_end_the_script_element_is_refused():
    tarball = _tarball({"build/vega.min.js": "s = '</script>';"})
    with pytest.raises(PlotsPageError, match="cannot be inlined"):
        script_text(tarball, _script(tarball))


def test_the_page_inlines_the_scripts_and_keeps_dvcs_placeholders():
    html = page({script: f"var {script.package.replace('-', '_')} = 1;" for script in SCRIPTS})
    assert "{plot_divs}" in html and "{refresh_tag}" in html and "{scripts}" not in html
    assert "http" not in html
    positions = [html.index(f"var {s.package.replace('-', '_')} = 1;") for s in SCRIPTS]
    assert positions == sorted(positions) and positions[-1] < html.index("{plot_divs}")
    assert all(s.integrity.startswith("sha512-") for s in SCRIPTS)
