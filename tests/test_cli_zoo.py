"""`interp zoo`: alone it prints its own help; `zoo list` shows the metrics each checkpoint records."""

from __future__ import annotations

import json

from interp.cli import main
from interp.models import zoo
from interp.models.zoo import checkpoint


def test_zoo_alone_prints_its_own_help(capsys):
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: interp zoo") and "list" in out and "train" in out


def test_zoo_list_shows_the_recorded_metrics(capsys):
    assert main(["zoo", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    entry = next(e for e in zoo.describe() if e["name"] == "digits-cnn")
    assert entry["has_checkpoint"]
    recorded = json.loads(checkpoint.metadata_path("digits-cnn").read_text())["metrics"]  # the JSON itself
    line = lines[lines.index(next(x for x in lines if x.startswith("zoo:digits-cnn"))) + 1]
    assert line.strip().startswith("recorded:")
    assert f"test_acc {recorded['test_acc']:.4g}" in line and f"test_loss {recorded['test_loss']:.4g}" in line
