"""Registry-ready: pyproject's [tool.comfy] names an icon that is in this repository, square and at most
400 x 400 px (the Registry's limit), and the ComfyUI versions the pack is tested on. `comfy node validate`
(comfy-cli) runs the Registry's own checks; see docs/development.md."""

import struct
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_registry_icon_is_the_repositorys_square_png():
    comfy = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    icon = comfy["Icon"]
    assert icon.startswith("https://raw.githubusercontent.com/") and icon.endswith("/main/icon.png"), icon
    data = (REPO / "icon.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width == height and 64 <= width <= 400, (width, height)
    assert comfy["requires-comfyui"] == ">=0.3.64"
