"""`make demo` runs `python -m segfast.demo`; its tiny setting runs here end to end."""

from __future__ import annotations

import av

from segfast.demo.__main__ import main


def test_demo_tiny_end_to_end(tmp_path, capsys):
    assert main(["--tiny", "--out", str(tmp_path), "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    for step in ("1. the demo model", "2. compiling", "3. video", "4. real microscopy",
                 "5. latency"):  # fmt: skip
        assert step in out
    assert "frames: in 6, out 6" in out
    with av.open(str(tmp_path / "microscopy_overlay.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 6
    png = tmp_path / "ihc_nuclei_overlay.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "eager" in out
    assert "torch" in out
