"""Zoo dictionaries: each shipped one loads, verifies, and reproduces its recorded evaluations."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from interp import sae as S
from interp.cli import main
from interp.errors import CheckpointError, InputError
from interp.sae import zoo_recipes as Z
from interp.sae.io import ZOO_DIR

# Recorded metrics are recomputed on the same held-out data; only float summation order may differ
# (thread counts, BLAS blocking), so the tolerance is far below any real change of the weights.
TOL = 1e-4
REPRODUCED = ("explained_variance", "mse", "l0", "l1", "cossim", "l2_ratio", "dead_fraction")


def _recorded(name: str) -> dict:
    return json.loads((ZOO_DIR / name / "cfg.json").read_text())["metadata"]["zoo"]


@pytest.mark.parametrize("name", Z.DICTIONARY_NAMES)
def test_zoo_dictionary_is_shipped_and_its_checksum_verifies(name):
    weights = ZOO_DIR / name / "sae_weights.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()  # independent of interp's reader
    assert (ZOO_DIR / name / "sae_weights.safetensors.sha256").read_text().split()[0] == digest
    sae = S.load(f"zoo:{name}")
    recipe = Z.get_dictionary_recipe(name)
    assert sae.cfg.hook_name == recipe.hook and sae.cfg.d_sae == recipe.options["d_sae"]
    assert sae.cfg.metadata["training"]["seed"] == recipe.options["seed"]
    assert sae.cfg.metadata["zoo"]["name"] == name and not sae.cfg.metadata["zoo"]["fast"]
    assert torch.isfinite(sae.W_dec).all()


@pytest.mark.parametrize("name", Z.DICTIONARY_NAMES)
def test_recorded_evaluations_are_reproduced(name):
    sae = S.load(f"zoo:{name}")
    recorded = _recorded(name)
    model = Z.source_model(name)
    result = Z.evaluate_dictionary(name, sae, model)
    assert result["total_tokens_evaluated"] == recorded["metrics"]["total_tokens_evaluated"]
    for key in REPRODUCED:
        assert result[key] == pytest.approx(recorded["metrics"][key], rel=TOL, abs=TOL), key
    recipe = Z.get_dictionary_recipe(name)
    if recipe.task_metrics is not None:
        again = recipe.task_metrics(model, sae)
        for key, value in recorded["task_metrics"].items():
            assert again[key] == pytest.approx(value, rel=TOL, abs=TOL), key


def test_minilm_dictionary_corpus_and_quality():
    record = _recorded("minilm-l3-resid-topk")
    text, now = Z.pydoc_corpus()
    if now["python"] != record["data"]["python"]:
        pytest.skip(f"the corpus was recorded on Python {record['data']['python']}; this is {now['python']}")
    assert hashlib.sha256(text.encode()).hexdigest() == record["data"]["sha256"] == now["sha256"]
    m = record["metrics"]
    # a real dictionary on real text: most variance explained, exactly k active, no dead latents
    assert m["explained_variance"] > 0.8 and m["l0"] == 32 and m["dead_fraction"] < 0.05
    assert record["data"]["train_tokens"] > 100_000 and record["data"]["eval_tokens"] > 10_000


def test_tms_dictionary_finds_every_represented_feature():
    from interp.reproductions.saes import tms_recovery

    model = Z.tms_instance()
    W = model.module.W[0]
    found = tms_recovery(S.load("zoo:tms-20-5-hidden"), W)
    assert len(found["represented"]) > W.shape[0]  # more features than dims: superposition
    assert found["min_cosine"] >= 0.99
    assert len(set(found["latent"])) == len(found["latent"])  # one latent per feature


def test_tms_instance_is_exactly_that_instance_of_the_zoo_model():
    from interp.models import zoo

    full, _ = zoo.load_zoo(Z.TMS_MODEL)
    one = Z.tms_instance()
    x = full.generate_batch(64)
    i = slice(Z.TMS_INSTANCE, Z.TMS_INSTANCE + 1)
    assert torch.equal(one.module(x[:, i]), full(x)[:, i])


def test_zoo_list_and_fast_retrain_through_the_cli(tmp_path, capsys):
    assert main(["zoo", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(f"zoo:{name}" in listed for name in Z.DICTIONARY_NAMES)
    assert main(["zoo", "train", "tms-20-5-hidden", "--fast", "--out", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    sae = S.load(tmp_path / "tms-20-5-hidden")
    assert sae.cfg.metadata["zoo"]["fast"] and sae.cfg.metadata["training"]["tokens"] == 100_000
    assert printed == sae.cfg.metadata["zoo"]["metrics"]


def test_bad_names_and_fast_without_out_dir():
    with pytest.raises(InputError, match="minilm-l3-resid-topk"):
        Z.get_dictionary_recipe("minilm-l3-resid")
    with pytest.raises(InputError, match="out_dir"):
        Z.train_dictionary("tms-20-5-hidden", fast=True)
    with pytest.raises(CheckpointError, match="Did you mean"):
        S.load("zoo:tms-20-5-hiden")
