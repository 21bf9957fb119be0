"""Hostile and malformed input (issue 13): every case gets a clear one-line error or is refused,
never a raw traceback or a silent wrong number. Load, run, methods, zoo and CLI; the store's cases
are in test_hostile_store.py.

Each test reproduces one reported input and asserts the message names the problem and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import interp
from interp.checks import check_finite, writable_dir
from interp.cli import main
from interp.errors import CheckpointError, InputError, ModelLoadError, UnknownHookError
from interp.methods import adversarial as A
from interp.methods import lens as L
from interp.methods import patching as P
from interp.methods import probing as Pr
from interp.models import zoo
from interp.models.zoo import checkpoint as ckpt

SHIPPED = ckpt.CHECKPOINT_DIR


@pytest.fixture(scope="module")
def induction():
    return interp.load("zoo:induction-1l")


@pytest.fixture(scope="module")
def digits():
    return interp.load("zoo:digits-cnn")


@pytest.fixture(scope="module")
def digit_batch():
    x, y, _, _ = zoo.digits_data()
    return x[:32], y[:32]


def _copy(name: str, directory: Path) -> Path:
    for f in SHIPPED.glob(f"{name}.*"):
        shutil.copy(f, directory / f.name)
    return directory


def _drop_hash(directory: Path, name: str) -> None:
    meta_path = directory / f"{name}.json"
    meta = json.loads(meta_path.read_text())
    del meta["files"][f"{name}.safetensors"]["sha256"]
    meta_path.write_text(json.dumps(meta))


def _flip_middle(path: Path, n: int = 64) -> None:
    """Flip ``n`` bytes in the middle of the tensor data, keeping the size (and the header) intact."""
    data = bytearray(path.read_bytes())
    mid = len(data) - (len(data) - 8) // 3
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------- checkpoints


def test_zoo_checkpoint_without_recorded_hash_is_refused_unless_unverified(tmp_path):
    _copy("tms-5-2", tmp_path)
    _drop_hash(tmp_path, "tms-5-2")
    with pytest.raises(CheckpointError, match=r"no sha256 recorded in tms-5-2\.json") as err:
        zoo.load_zoo("tms-5-2", directory=tmp_path)
    assert "verify=False" in str(err.value) and "interp zoo train tms-5-2" in str(err.value)
    model, _ = zoo.load_zoo("tms-5-2", directory=tmp_path, verify=False)  # the explicit opt-out
    shipped, _ = zoo.load_zoo("tms-5-2")
    for key, value in shipped.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_byte_flipped_zoo_weights_without_hash_do_not_load_silently(tmp_path, monkeypatch, induction):
    _copy("induction-1l", tmp_path)
    _drop_hash(tmp_path, "induction-1l")
    _flip_middle(tmp_path / "induction-1l.safetensors")
    monkeypatch.setattr(ckpt, "CHECKPOINT_DIR", tmp_path)  # interp.load("zoo:...") reads from here
    with pytest.raises(CheckpointError, match="cannot be verified and may have been modified"):
        interp.load("zoo:induction-1l")
    flipped = interp.load("zoo:induction-1l", verify=False)  # loads only on the user's explicit word
    original = induction.module.state_dict()  # the shipped weights
    differs = [k for k, v in original.items() if not torch.equal(v, flipped.module.state_dict()[k])]
    assert differs  # the flip really changed weights: refusing them was right


def test_verified_files_round_trip_and_refuse_changes(tmp_path):
    path = tmp_path / "sae.safetensors"
    tensors = {"W_enc": torch.randn(8, 32), "b_enc": torch.zeros(32)}
    digest = ckpt.write_verified(path, tensors, {"kind": "sae"})
    assert ckpt.sidecar_path(path).read_text().split() == [digest, path.name]
    assert digest == ckpt.sha256(path)
    back = ckpt.read_verified(path)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    _flip_middle(path, 16)
    with pytest.raises(CheckpointError, match="does not match the hash recorded in its sidecar"):
        ckpt.read_verified(path)
    with pytest.raises(CheckpointError, match="does not match the hash recorded in"):
        ckpt.read_verified(path, expected=digest)
    ckpt.sidecar_path(path).unlink()
    with pytest.raises(CheckpointError, match="no sha256 recorded in its sidecar.*verify=False"):
        ckpt.read_verified(path)
    assert set(ckpt.read_verified(path, verify=False)) == set(tensors)


# ---------------------------------------------------------------------------------------- load


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_named_not_blamed_on_weights():
    with pytest.raises(InputError, match="CUDA is not available here.*device='cpu'") as err:
        interp.load("zoo:induction-1l", device="cuda")
    assert "corrupt" not in str(err.value)
    with pytest.raises(InputError, match="not a torch device"):
        interp.load(nn.Linear(2, 2), device="gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_capture_to_cuda_without_cuda_is_named_before_the_forward():
    model = interp.load(nn.Linear(2, 2))
    with pytest.raises(InputError, match="CUDA is not available here.*device='cpu'"):
        model.run_with_cache(torch.ones(1, 2), device="cuda")


def _hf_copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_corrupt_tokenizer_is_reported_at_load(gpt2_dir, tmp_path):
    d = _hf_copy(gpt2_dir, tmp_path / "m")
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer of .* is corrupt or unreadable \\(tokenizer.json"):
        interp.load(str(d))


def test_config_errors_do_not_blame_the_weights(gpt2_dir, tmp_path):
    d = _hf_copy(gpt2_dir, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "n_embd": 31}))  # not divisible by 4 heads
    with pytest.raises(ModelLoadError, match="config.json describes cannot be built") as err:
        interp.load(str(d))
    assert "weights may be corrupt" not in str(err.value)
    remote = {**config, "model_type": "custom-hostile", "auto_map": {"AutoConfig": "x.C", "AutoModel": "x.M"}}
    (d / "config.json").write_text(json.dumps(remote))
    with pytest.raises(ModelLoadError, match="remote code.*trust_remote_code=True") as err:
        interp.load(str(d))
    assert "weights may be corrupt" not in str(err.value)


class _Hostile:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_unsafe_pickle_is_refused_as_such(gpt2_dir, tmp_path):
    d = _hf_copy(gpt2_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": _Hostile()}, d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle that calls code, which is refused") as err:
        interp.load(str(d))
    assert "may be corrupt" not in str(err.value) and "\n" not in str(err.value)


def test_damaged_weights_still_say_weights(gpt2_dir, tmp_path):
    d = _hf_copy(gpt2_dir, tmp_path / "m")
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="weights are unreadable.*corrupt or truncated"):
        interp.load(str(d))


def test_module_without_submodules_gets_its_own_hook_points():
    model = interp.load(nn.Identity())
    assert model.hook_names == ["hook_in", "hook_out"]
    x = torch.randn(2, 3)
    _, cache = model.run_with_cache(x)
    assert torch.equal(cache["hook_in"], x) and torch.equal(cache["hook_out"], x)
    linear = interp.load(nn.Linear(3, 2), input_shape=(3,))
    assert linear.hook_shapes == {"hook_in": ("batch", 3), "hook_out": ("batch", 2)}
    y = linear.run_with_hooks(x, [("hook_out", lambda act, hook: act * 0)])
    assert torch.equal(y, torch.zeros(2, 2))


@pytest.mark.parametrize(
    ("module", "shape", "message"),
    [
        (nn.Linear(3, 2), (4,), r"cannot run a batch of input_shape=\(4,\)"),
        (nn.Conv2d(1, 2, 3), (5,), r"cannot run a batch of input_shape=\(5,\)"),
        (nn.Linear(3, 2), (0, 3), "must be a tuple of positive ints"),
        (nn.Linear(3, 2), "3", "must be a tuple of positive ints"),
    ],
)
def test_wrong_input_shape_is_reported_at_load(module, shape, message):
    with pytest.raises(InputError, match=message):
        interp.load(module, input_shape=shape)


# ---------------------------------------------------------------------------------------- run


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (torch.zeros(1, 0, dtype=torch.long), r"shape \(1, 0\) hold no tokens"),
        ([], r"got no input \(\[\]\)"),
        (None, r"got no input \(None\)"),
        ({"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1]]}, "attention_mask has shape"),
        ({"input_ids": [[1, 2]], "attention_mask": [[0, 0]]}, "have no real token"),
        (object(), "cannot read a object as token ids"),
    ],
)
def test_empty_or_missing_token_inputs(induction, inputs, message):
    with pytest.raises(InputError, match=message):
        induction(inputs)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ("a photo of a seven", "is not a text model"),
        (["two", "texts"], "is not a text model"),
        (None, r"got no input \(None\)"),
        ([], r"got an empty input of shape \(0,\)"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.complex64), "takes real numbers"),
    ],
)
def test_bad_inputs_to_an_image_model(digits, inputs, message):
    with pytest.raises(InputError, match=message):
        digits(inputs)


def test_nan_and_inf_pixels_are_refused(digits, digit_batch):
    x = digit_batch[0].clone()
    x[0, 0, 3, 3] = float("nan")
    with pytest.raises(InputError, match=r"input to zoo:digits-cnn holds 1 NaN and 0 inf"):
        digits(x)
    x[0, 0, 3, 3] = float("inf")
    with pytest.raises(InputError, match="holds 0 NaN and 1 inf"):
        digits.run_with_cache(x)
    bare = interp.load(nn.Linear(3, 2))  # no input_range: the finite check alone
    with pytest.raises(InputError, match="holds 1 NaN"):
        bare(torch.tensor([[0.0, float("nan"), 1.0]]))
    with check_finite(False):  # the documented opt-out
        assert torch.isnan(bare(torch.tensor([[0.0, float("nan"), 1.0]]))).any()


def test_a_hook_that_writes_nan_is_flagged(induction):
    tokens = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(InputError, match="hook on 'blocks.0.hook_resid_post' left NaN or inf"):
        induction.run_with_hooks(tokens, [("blocks.0.hook_resid_post", lambda act, hook: act / 0 * 0)])

    def in_place(act, hook):
        act[:, 1] = float("nan")

    with pytest.raises(InputError, match="hook on 'blocks.0.hook_attn_out' left NaN"):
        induction.run_with_hooks(tokens, [("blocks.0.hook_attn_out", in_place)])
    with pytest.raises(InputError, match="left NaN or inf"):
        induction.run_with_cache(tokens, hooks=[("hook_embed", lambda act, hook: act + float("inf"))])


def test_minus_inf_attention_knockout_is_allowed(gpt2_model):
    """-inf on the pre-softmax scores is how a key is knocked out: allowed, and it takes effect."""
    tokens = torch.tensor([[1, 2, 3, 4, 5]])

    def knock_out_bos(scores, hook):
        scores = scores.clone()
        scores[..., 1:, 0] = float("-inf")
        return scores

    _, cache = gpt2_model.run_with_cache(
        tokens, names="blocks.0.attn.hook_pattern", hooks=[("blocks.0.attn.hook_attn_scores", knock_out_bos)]
    )
    pattern = cache["blocks.0.attn.hook_pattern"]
    assert torch.all(pattern[..., 1:, 0] == 0) and torch.isfinite(pattern).all()
    assert torch.allclose(pattern.sum(-1), torch.ones(()))
    with pytest.raises(InputError, match="left NaN or inf"):  # +inf scores give NaN after softmax
        gpt2_model.run_with_hooks(tokens, [("blocks.0.attn.hook_attn_scores", lambda s, h: s + float("inf"))])


def test_bad_regex_is_a_message_not_re_error(induction):
    with pytest.raises(UnknownHookError, match=r"'re:\(\(' is not a valid regular expression"):
        induction.resolve("re:((")
    with pytest.raises(UnknownHookError, match="must be strings or compiled regexes, got int"):
        induction.resolve([3])


# ---------------------------------------------------------------------------------------- attacks


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": -1.0, "steps": 3}, "alpha must be a number >= 0 and finite .*reverses the attack"),
        ({"alpha": float("nan")}, "alpha must be a number >= 0 and finite"),
        ({"alpha": float("inf")}, "alpha must be a number >= 0 and finite"),
        ({"steps": -1}, "steps must be a whole number >= 0"),
        ({"steps": 2.5}, "steps must be a whole number >= 0"),
        ({"restarts": 0}, "restarts must be a whole number >= 1"),
    ],
)
def test_pgd_refuses_steps_that_would_not_attack(digits, digit_batch, kwargs, message):
    x, y = digit_batch
    with pytest.raises(InputError, match=message):
        A.pgd(digits, x, y, 0.1, **kwargs)


@pytest.mark.parametrize("eps", [float("nan"), float("inf"), -0.1, "0.1"])
def test_attacks_refuse_a_bad_budget(digits, digit_batch, eps):
    x, y = digit_batch
    with pytest.raises(InputError, match="eps must be a number >= 0 and finite"):
        A.fgsm(digits, x, y, eps)


def test_labels_and_targets_outside_the_classes(digits, digit_batch):
    x, y = digit_batch
    bad = y.clone()
    bad[0] = 10
    with pytest.raises(InputError, match=r"labels must be classes in \[0, 10\).*got values in \[\d, 10\]"):
        A.pgd(digits, x, bad, 0.1, steps=1)
    with pytest.raises(InputError, match=r"target must be classes in \[0, 10\)"):
        A.fgsm(digits, x, y, 0.1, target=-1)
    with pytest.raises(InputError, match="labels must be integer class indices"):
        A.fgsm(digits, x, y.float() + 0.5, 0.1)
    with pytest.raises(InputError, match="labels must be integer class indices"):
        A.fgsm(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), x, ["a"] * len(x), 0.1)


def test_plain_module_attack_refuses_nan_images(digit_batch):
    x, y = digit_batch
    x = x.clone()
    x[1, 0, 0, 0] = float("nan")  # would pass the [0, 1] range check: NaN compares false
    with pytest.raises(InputError, match="the images holds 1 NaN"):
        A.fgsm(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), x, y, 0.1)


# ---------------------------------------------------------------------------------------- probes


def _blobs(n: int = 80, d: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    return torch.randn(n, d, generator=g) + 2 * y[:, None], y


def test_probe_refuses_nan_features_instead_of_scoring_chance():
    x, y = _blobs()
    with pytest.raises(InputError, match=r"probe features holds 480 NaN.*Drop or impute"):
        Pr.fit_probe(torch.full_like(x, float("nan")), y)
    x[3, 2] = float("inf")
    with pytest.raises(InputError, match="holds 0 NaN and 1 inf"):
        Pr.fit_probe(x, y)


@pytest.mark.parametrize(
    ("features", "labels", "kwargs", "message"),
    [
        (
            torch.zeros(0, 4),
            torch.zeros(0, dtype=torch.long),
            {},
            r"no data to probe: features have shape \(0, 4\)",
        ),
        (torch.zeros(10, 0), torch.zeros(10, dtype=torch.long), {}, "no data to probe"),
        (torch.randn(80, 4), torch.rand(80), {}, "classification labels must be class ids"),
        (
            torch.randn(80, 4),
            torch.full((80,), float("nan")),
            {"task": "regression"},
            "regression targets holds 80 NaN",
        ),
        (torch.randn(80, 4), torch.arange(80) % 2, {"C": float("nan")}, "C must be positive"),
        (
            torch.randn(80, 4),
            torch.arange(80) % 2,
            {"train_idx": torch.arange(60), "test_idx": torch.arange(60, 90)},
            r"test_idx holds row indices outside \[0, 80\)",
        ),
    ],
)
def test_probe_inputs_are_validated(features, labels, kwargs, message):
    with pytest.raises(InputError, match=message):
        Pr.fit_probe(features, labels, **kwargs)


def test_probe_class_outside_its_classes():
    x, y = _blobs()
    probe = Pr.fit_probe(x, y)
    assert probe.test_score > 0.9  # the valid probe still works
    with pytest.raises(InputError, match=r"class 7 is not one of the probe's classes \[0, 1\]"):
        probe.direction(7)


def test_accuracy_metric_labels_outside_the_model_classes(digits, digit_batch):
    x, y = digit_batch
    bad = y.clone()
    bad[0] = 12
    with pytest.raises(InputError, match=r"labels must be classes in \[0, 10\)"):
        Pr.accuracy_metric(bad)(digits(x))
    assert Pr.accuracy_metric(y)(digits(x)) == (digits(x).argmax(-1) == y).double().mean().item()


# ---------------------------------------------------------------------------------------- patching, lens


CLEAN, CORRUPT = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 2, 5, 4]])


@pytest.mark.parametrize(
    ("metric", "message"),
    [
        (lambda out: float("nan"), r"returned nan: not a finite number"),
        (lambda out: torch.tensor(float("inf")), r"returned inf: not a finite number"),
        (lambda out: out[:, -1, :2].sum(-1).repeat(2), r"returned shape \(2,\)"),
        (lambda out: "high", "returned a str; it must return one number"),
    ],
)
def test_patching_metric_must_be_one_finite_number(induction, metric, message):
    with pytest.raises(InputError, match=message):
        P.patch(induction, CLEAN, CORRUPT, site="resid_pre", metric=metric)


def test_metric_that_turns_nan_mid_sweep_is_refused(induction):
    calls = {"n": 0}

    def flaky(out):
        calls["n"] += 1
        return out[0, -1, 0] if calls["n"] <= 2 else out[0, -1, 0] * float("nan")

    with pytest.raises(InputError, match="the metric 'flaky' returned nan"):
        P.patch(induction, CLEAN, CORRUPT, site="resid_pre", metric=flaky)
    assert calls["n"] > 2  # the unpatched runs passed; a patched one was refused


def test_logit_diff_token_outside_the_vocabulary(induction):
    with pytest.raises(
        InputError, match=r"correct token id\(s\) \[1000000\] are outside the vocabulary \[0, 65\)"
    ):
        P.patch(induction, CLEAN, CORRUPT, metric=P.logit_diff(10**6, 0))
    with pytest.raises(InputError, match=r"incorrect token id\(s\) \[-3\]"):
        P.patch(induction, CLEAN, CORRUPT, metric=P.logit_diff(1, -3))
    with pytest.raises(InputError, match="reads position 9 but the prompts have 4 tokens"):
        P.patch(induction, CLEAN, CORRUPT, metric=P.logit_diff(1, 2, pos=9))


def test_logit_lens_position_past_the_end(induction):
    with pytest.raises(InputError, match=r"positions \[5\] are not positions of these prompts \(4 tokens\)"):
        L.logit_lens(induction, CLEAN, positions=[0, 5])
    result = L.logit_lens(induction, CLEAN, positions=[-1])
    assert torch.allclose(result.logits[-1, :, 0], induction(CLEAN)[:, -1], atol=1e-4)


# ---------------------------------------------------------------------------------------- zoo, CLI


def _unwritable(tmp_path: Path) -> Path:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    return blocker / "out"


def test_zoo_train_checks_the_output_directory_before_training(tmp_path, monkeypatch):
    recipe = zoo.get_recipe("tms-5-2")

    def must_not_train(*args, **kwargs):
        raise AssertionError("training started although the output directory is unusable")

    monkeypatch.setattr(zoo, "get_recipe", lambda name: dataclasses.replace(recipe, fit=must_not_train))
    with pytest.raises(InputError, match="zoo output directory .* is inside .*a-file', which is a file"):
        zoo.train("tms-5-2", _unwritable(tmp_path), fast=True)


def test_writable_dir_probes_without_creating(tmp_path):
    target = tmp_path / "new" / "deeper"
    assert writable_dir(target) == target and not (tmp_path / "new").exists()
    if Path("/sys").is_dir():  # sysfs refuses new files even to root
        with pytest.raises(InputError, match="is not writable"):
            writable_dir("/sys/interp-hostile-out")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_bad_regex_exits_2(capsys):
    assert main(["hooks", "zoo:induction-1l", "--filter", "re:(("]) == 2
    assert "is not a valid regular expression" in _one_error_line(capsys)


def test_cli_capture_out_is_a_file_or_unwritable(tmp_path, capsys):
    texts = tmp_path / "in.txt"
    texts.write_text("the cat\na dog\n")
    out_file = tmp_path / "taken"
    out_file.write_text("user data")
    args = ["capture", "--model", "zoo:induction-1l", "--hooks", "hook_embed", "--input", str(texts)]
    assert main([*args, "--out", str(out_file)]) == 2
    assert "is a file, not a directory" in _one_error_line(capsys)
    assert out_file.read_text() == "user data"
    assert main([*args, "--out", str(out_file / "sub")]) == 2
    assert "which is a file" in _one_error_line(capsys)
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--out", str(tmp_path / "o"), "--batch-size", "0"])
    assert exit_.value.code == 2 and "expected a whole number >= 1, got 0" in capsys.readouterr().err
    assert main([*args[:-2], "--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a file" in _one_error_line(capsys)


def test_cli_zoo_train_unwritable_out_exits_2_before_training(tmp_path, capsys, monkeypatch):
    recipe = zoo.get_recipe("tms-5-2")
    monkeypatch.setattr(zoo, "get_recipe", lambda name: dataclasses.replace(recipe, fit=None))
    assert main(["zoo", "train", "tms-5-2", "--fast", "--out", str(_unwritable(tmp_path))]) == 2
    assert "zoo output directory" in _one_error_line(capsys)


def test_cli_os_errors_exit_2_without_traceback(capsys, monkeypatch):
    import interp.cli as cli

    def read_only(args):
        raise PermissionError(13, "Permission denied", "/data/out")

    monkeypatch.setattr(cli, "_models", read_only)
    assert main(["models"]) == 2
    assert "cannot use the path '/data/out': Permission denied" in _one_error_line(capsys)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "interp.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_subprocess_exit_code_and_no_traceback(tmp_path):
    """As a user runs it: --out names a file; exit 2, one line, no traceback, the file intact."""
    taken = tmp_path / "taken"
    taken.write_text("user data")
    texts = tmp_path / "in.txt"
    texts.write_text("the cat\n")
    result = _run("capture", "--model", "zoo:induction-1l", "--hooks", "re:((", "--input", str(texts),
                  "--out", str(taken))  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "is a file, not a directory" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and taken.read_text() == "user data"


# ---------------------------------------------------------------------------------------- found probing as an attacker


def test_meta_device_is_refused():
    with pytest.raises(InputError, match="device='meta' holds no values"):
        interp.load(nn.Linear(2, 2), device="meta")


def test_hook_returning_integers_for_a_float_activation(induction):
    with pytest.raises(InputError, match="returned a torch.int64 tensor for a torch.float32 activation"):
        induction.run_with_hooks(CLEAN, [("hook_embed", lambda act, hook: act.long())])


def test_direct_logit_attribution_bad_token_and_position(induction):
    with pytest.raises(InputError, match=r"correct token id\(s\) \[1000000\] are outside the vocabulary"):
        L.direct_logit_attribution(induction, CLEAN, 10**6)
    with pytest.raises(InputError, match=r"positions \[7\] are not positions of these prompts \(4 tokens\)"):
        L.direct_logit_attribution(induction, CLEAN, 1, pos=7)


def test_inverted_ranges_are_refused(digits, digit_batch):
    x, y = digit_batch
    with pytest.raises(InputError, match=r"bounds must be finite with low < high.*\(1.0, 0.0\)"):
        A.pgd(digits, x, y, 0.1, steps=1, bounds=(1.0, 0.0))
    with pytest.raises(InputError, match=r"input_range for Linear must be \(low, high\) with low < high"):
        interp.load(nn.Linear(2, 2), input_range=(1.0, 0.0))


def test_collect_features_batch_size_zero(induction):
    with pytest.raises(InputError, match="batch_size must be a whole number >= 1"):
        Pr.collect_features(induction, torch.tensor([[1, 2, 3], [1, 2, 4]]), [0, 1], batch_size=0)


def test_probe_scoring_checks_its_features():
    x, y = _blobs()
    probe = Pr.fit_probe(x, y)
    with pytest.raises(InputError, match="features to score holds 12 NaN"):
        probe.score(torch.full((2, 6), float("nan")), torch.ones(2, dtype=torch.long))  # was a silent 0.0
    with pytest.raises(InputError, match=r"the probe reads \[items, 6\] features, got shape \(5, 7\)"):
        probe.predict(torch.randn(5, 7))
    with pytest.raises(InputError, match="got 3 labels for 5 feature rows"):
        probe.score(x[:5], y[:3])


def test_embedding_attack_positions_and_attack_probe_share(induction, digits, digit_batch):
    with pytest.raises(
        InputError, match=r"positions \[9\] are not token positions of these prompts \(4 tokens\)"
    ):
        A.embedding_pgd(induction, CLEAN, positions=[9], steps=1)
    x, y = digit_batch
    with pytest.raises(InputError, match=r"topk_frac must be a share of units in \(0, 1\], got 5.0"):
        A.attack_probe(digits, x, x, y, topk_frac=5.0)
