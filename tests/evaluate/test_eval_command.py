"""``contrastive-jax eval`` never loses its results (issue 17, defect 7).

The results are written atomically and printed; stdout is the JSON alone; ``step`` is the
checkpoint actually evaluated (an older one when the newest is unreadable); a read-only run
directory takes ``--output`` and, without it, fails in one line before anything is evaluated.
"""
import contextlib
import json
import os
import shutil
import subprocess
import types

import flax.linen as nn
import jax
import numpy as np
import pytest

from contrastive_jax import cli, data
from contrastive_jax.commands import eval as eval_cmd
from contrastive_jax.train.builder import build_model
from contrastive_jax.train.config import load_config
from contrastive_jax.train.restore import write_model_dir

EVAL_ARGS = ["--config.data.num_train=16", "--config.data.num_validation=8", "--config.data.num_test=16",
             "--config.eval.evaluators=['retrieval']", "--config.eval.batch_size=16"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny model directory with a good checkpoint at step 0 and an unreadable newer one at 7."""
    root = tmp_path_factory.mktemp("evalcmd")
    cfg = load_config("configs/quickstart.py:tiny", [f"data.data_dir={root / 'tfds'}"])
    tok = data.build_tokenizer(cfg.data)  # shapes' fixed word list: nothing generated
    built = build_model(cfg, tok)
    # Shapes only, filled with small random numbers: initializing for real costs seconds of compiling
    # and evaluation does not care whether the weights were trained.
    abstract = jax.eval_shape(lambda *xs: built.model.init(jax.random.key(0), *xs), *built.inputs)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(a.dtype), nn.meta.unbox(abstract))
    run = write_model_dir(str(root / "run"), cfg, params, tok)
    newer = os.path.join(run, "checkpoints", "7")
    shutil.copytree(os.path.join(run, "checkpoints", "0"), newer)
    for folder, _, files in os.walk(os.path.join(newer, "state")):
        for f in files:  # every file of step 7 truncated: as after a crash mid-write
            with open(os.path.join(folder, f), "r+b") as fh:
                fh.truncate(3)
    return root, run


@contextlib.contextmanager
def _read_only(folder):
    """``folder`` seen read-only: chmod for a normal user; a read-only bind mount as root (root
    ignores permission bits)."""
    if os.geteuid() != 0:
        modes = {}
        for d, _, files in os.walk(folder):
            for p in [d] + [os.path.join(d, f) for f in files]:
                modes[p] = os.stat(p).st_mode
                os.chmod(p, modes[p] & 0o555)
        try:
            yield folder
        finally:
            for p, mode in modes.items():
                os.chmod(p, mode)
        return
    mount = f"{folder}-ro"
    os.makedirs(mount, exist_ok=True)
    ok = subprocess.run(["mount", "--bind", folder, mount], capture_output=True).returncode == 0 and \
        subprocess.run(["mount", "-o", "remount,ro,bind", mount], capture_output=True).returncode == 0
    if not ok:
        subprocess.run(["umount", mount], capture_output=True)
        pytest.skip("running as root without permission to make a read-only bind mount: a read-only "
                    "run directory cannot be made here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", mount], check=True)


def _eval(capsys, *argv):
    rc = cli.main(["eval", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_eval_prints_json_only_writes_atomically_and_records_the_step_used(run_dir, capsys):
    root, run = run_dir
    rc, out, err = _eval(capsys, "--checkpoint", run, f"--config.data.data_dir={root / 'tfds'}", *EVAL_ARGS)
    assert rc == 0, err
    printed = json.loads(out)  # stdout is the JSON alone (dataset generation logged to stderr)
    assert printed["step"] == 0  # step 7 is unreadable: the older checkpoint was evaluated and said so
    assert printed["output"] == os.path.join(run, "eval.json")
    saved = json.loads(open(os.path.join(run, "eval.json"), encoding="utf-8").read())
    assert saved == {k: v for k, v in printed.items() if k != "output"}
    assert 0.0 <= saved["eval"]["retrieval/image_to_text/R@1"] <= 1.0 and saved["evaluators"] == ["retrieval"]
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]  # no temporary file left behind


def test_read_only_run_dir_fails_before_evaluating_then_takes_output(run_dir, capsys, monkeypatch, tmp_path):
    root, run = run_dir
    calls = []
    real = eval_cmd.build_runner_and_step
    monkeypatch.setattr(eval_cmd, "build_runner_and_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    with _read_only(run) as ro:
        rc, out, err = _eval(capsys, "--checkpoint", ro, f"--config.data.data_dir={root / 'tfds'}", *EVAL_ARGS)
        assert rc == 2 and out == "" and not calls  # nothing was loaded or evaluated
        lines = err.strip().splitlines()
        assert len(lines) == 1 and os.path.join(ro, "eval.json") in lines[0] and "--output PATH" in lines[0]
        target = tmp_path / "elsewhere" / "eval.json"
        os.makedirs(target.parent)
        rc, out, err = _eval(capsys, "--checkpoint", f"{ro}/checkpoints/0", "--output", str(target),
                             f"--config.data.data_dir={root / 'tfds'}", *EVAL_ARGS)
        assert rc == 0, err
        assert json.loads(out)["step"] == 0 and json.loads(target.read_text())["checkpoint"] == ro


def test_output_in_a_missing_folder_fails_in_one_line_before_evaluating(run_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(eval_cmd, "build_runner_and_step", lambda *a, **k: pytest.fail("evaluated"))
    rc, out, err = _eval(capsys, "--checkpoint", run_dir[1], "--output", str(tmp_path / "no" / "such" / "e.json"))
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and "no/such/e.json" in err


def test_results_are_printed_when_the_write_fails_after_evaluating(run_dir, capsys, monkeypatch, tmp_path):
    class FakeRunner:  # what an evaluation returns, without a model
        specs = [types.SimpleNamespace(name="retrieval")]

        def __call__(self, params):
            return {"retrieval/image_to_text/R@1": np.float32(0.25)}

    config = types.SimpleNamespace(data=types.SimpleNamespace(eval_split="test"))
    monkeypatch.setattr(eval_cmd, "build_runner_and_step", lambda *a, **k: (FakeRunner(), None, config, 3))

    def disk_full(path, payload):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(eval_cmd, "write_json_atomic", disk_full)
    rc, out, err = _eval(capsys, "--checkpoint", run_dir[1], "--output", str(tmp_path / "e.json"))
    assert rc == 2
    printed = json.loads(out)
    assert printed["eval"] == {"retrieval/image_to_text/R@1": 0.25} and printed["step"] == 3
    assert "No space left on device" in err and "the results are on stdout" in err


def test_atomic_write_keeps_the_previous_file_on_failure(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text('{"old": true}')
    with pytest.raises(TypeError):
        eval_cmd.write_json_atomic(str(path), {"bad": object()} | {1j: 1})  # a key JSON cannot hold
    assert json.loads(path.read_text()) == {"old": True} and os.listdir(tmp_path) == ["eval.json"]
    eval_cmd.write_json_atomic(str(path), {"new": 1})
    assert json.loads(path.read_text()) == {"new": 1}
