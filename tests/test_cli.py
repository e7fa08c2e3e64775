"""The CLI's first-run path: the sample photo that ships with samkit, and what `samkit segment` prints."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from samkit import cli


def test_sample_prints_a_shipped_photo(capsys):
    assert cli.main(["sample"]) == 0
    path = capsys.readouterr().out.strip()
    assert path == str(cli.SAMPLE_IMAGE)
    with Image.open(path) as im:
        assert im.format == "JPEG" and im.size == (600, 400)


def test_segment_help_gives_an_example_on_the_sample(capsys):
    with pytest.raises(SystemExit):
        cli.main(["segment", "--help"])
    assert 'samkit segment "$(samkit sample)" --point 365,285 --out out/' in capsys.readouterr().out


def test_segment_on_the_sample_with_the_bundled_model(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SAMKIT_HOME", str(tmp_path / "home"))
    out = tmp_path / "out"
    code = cli.main(
        ["segment", str(cli.SAMPLE_IMAGE), "--point", "365,285", "--model", "nano", "--out", str(out)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert (
        "3 mask(s)" in printed
        and "(the model's own estimate of the mask's quality; it can exceed 1)" in printed
    )
    scores = json.loads((out / "coffee_scores.json").read_text())
    assert [m["file"] for m in scores["masks"]] == [f"coffee_mask_{i:04d}.png" for i in range(3)]
    best = scores["masks"][0]
    # The spoon's bowl: a few thousand pixels of the 600 x 400 photo, not the saucer or the whole table.
    assert 1_500 < best["area"] < 12_000, best
    assert (out / "coffee_overlay.png").is_file()


def test_serve_builds_its_config_from_the_options(monkeypatch, tmp_path):
    pytest.importorskip("fastapi", reason="samkit serve needs the app extra")
    import samkit.serve as serve_module

    seen = {}
    monkeypatch.setattr(serve_module, "serve", lambda config, **where: seen.update(config=config, **where))
    argv = ["serve", "--model", "nano", "--cache-dir", str(tmp_path), "--max-embeddings", "7"]
    argv += ["--max-upload-mb", "3.5", "--dtype", "fp32", "--token", "secret", "--port", "8123"]
    assert cli.main([*argv, "--workers", "2", "--allow-host", "example.org"]) == 0
    expected = serve_module.ServeConfig(
        model="nano",
        cache_dir=str(tmp_path),
        max_embeddings=7,
        max_upload_mb=3.5,
        dtype="fp32",
        token="secret",
    )
    assert seen == {
        "config": expected,
        "host": "127.0.0.1",
        "port": 8123,
        "workers": 2,
        "allow_hosts": ["example.org"],
    }
