"""Optional dependencies: the core install is enough for the main job, and a missing extra is one line naming it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import tomllib

from samkit import cli
from samkit.errors import MissingExtraError
from samkit.eval import run_eval
from samkit.extras import EXTRAS, require
from samkit.train.loop import plot_curves

ROOT = Path(__file__).resolve().parents[1]
MOVED = {"fastapi", "uvicorn", "python-multipart", "matplotlib", "pyedgeeval"}


def _block(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make `import module` fail as if the package were not installed."""
    for module in modules:
        for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, module, None)


def _names(requirements: list[str]) -> set[str]:
    return {r.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in requirements}


def test_web_and_plot_packages_are_extras_that_the_test_extra_pulls_in():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert not MOVED & _names(project["dependencies"])
    assert _names(extras["app"]) == {"fastapi", "uvicorn", "python-multipart"}
    assert _names(extras["eval"]) == {"matplotlib", "pyedgeeval"}
    assert any(
        r.replace(" ", "").startswith("samkit[") and "app" in r and "eval" in r for r in extras["test"]
    )
    assert "samkit[app]" in extras["labelstudio"]  # its backend is a FastAPI app too
    assert {pip for name in ("app", "eval") for pip, _ in EXTRAS[name]} == MOVED
    assert _names(extras["export"]) == {pip for pip, _ in EXTRAS["export"]}


def test_require_names_the_missing_package_and_the_extra(monkeypatch):
    require("app", "samkit serve")  # installed here: no error
    _block(monkeypatch, "uvicorn")
    with pytest.raises(MissingExtraError) as exc:
        require("app", "samkit serve")
    assert str(exc.value) == "samkit serve needs uvicorn: pip install 'samkit[app]'"


@pytest.mark.parametrize("command", [["serve"], ["annotate", "photos/"], ["labelstudio"]])
def test_cli_web_commands_without_the_app_extra_fail_in_one_line(monkeypatch, capsys, command):
    _block(monkeypatch, "fastapi")
    assert cli.main(command) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"samkit: error: samkit {command[0]} needs fastapi")
    assert "pip install 'samkit[app]'" in err


def test_onnx_export_without_the_export_extra_fails_in_one_line(monkeypatch, capsys, tmp_path):
    _block(monkeypatch, "onnxscript")
    assert cli.main(["export-onnx", "--model", "nano", "--out", str(tmp_path / "onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "samkit: error: samkit export-onnx needs onnxscript: pip install 'samkit[export]'"
    assert not (tmp_path / "onnx").exists()


def test_edges_protocol_without_the_eval_extra_fails_before_any_work(monkeypatch):
    _block(monkeypatch, "pyEdgeEval")
    with pytest.raises(MissingExtraError, match=r"edges protocol needs pyedgeeval.*samkit\[eval\]"):
        run_eval("edges", "/nonexistent", "grabcut")


def test_training_curves_are_skipped_with_a_note_without_matplotlib(monkeypatch, capsys, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "loss": 1.0, "iou_first": 0.5, "iou_last": 0.6}) + "\n")
    _block(monkeypatch, "matplotlib")
    assert plot_curves(metrics, tmp_path / "curves.png") is None
    assert not (tmp_path / "curves.png").exists()
    assert "curves.png not written: the training plot needs matplotlib" in capsys.readouterr().err
