"""User errors in a run config: one line naming the field and what is valid, exit code 2, before
any expensive work (no dataset generated, no workdir created, no model built).

Issue 17, defect 5: each case of the issue is its own test row, through ``contrastive_jax.cli.main``
in-process (the CLI's own code path) plus one real subprocess for the exit code.
"""
import subprocess
import sys

import pytest

from contrastive_jax import cli
from contrastive_jax.train.config import ConfigError, default_config, load_config

TINY = "configs/quickstart.py:tiny"


def _train(tmp_path, capsys, *extra, spec=TINY):
    """Runs ``contrastive-jax train`` in-process -> (exit code, stderr lines, stdout)."""
    data_dir, workdir = tmp_path / "data", tmp_path / "w"
    argv = ["train", "--config", spec, "--workdir", str(workdir), f"--config.data.data_dir={data_dir}", *extra]
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse / the override splitter exit this way
        rc = e.code
    out, err = capsys.readouterr()
    # Nothing expensive happened: the dataset was not generated and the workdir not created.
    assert not data_dir.exists() and not workdir.exists()
    return rc, [line for line in err.splitlines() if line.strip()], out


# (override, words the one-line message must contain: the field and what would be valid)
CASES = [
    ("--config.train.batch_size=abc", ["config.train.batch_size", "integer", "'abc'"]),
    ("--config.mesh=abc", ["config.mesh", "[('data', -1)]"]),
    ("--config.loss.impl=fast", ["config.loss.impl", "'fast'", "dense, chunked, ring"]),
    # Rejected by the tower builder itself, found before any data or compilation.
    ("--config.model.image.pool=bogus", ["model.image.pool", "'bogus'", "gap, cls, map"]),
    ("--config.data.image_size=30", ["config.data.image_size=30", "patch_size=8", "multiple of 8", "32"]),
    ("--config.optim.lr=-1", ["config.optim.lr=-1", "> 0"]),
    ("--config.train.total_steps=-5", ["config.train.total_steps=-5", ">= 0"]),
    ("--config.optim.warmup_steps=100", ["config.optim.warmup_steps", "100 steps", "20 steps", "longer than the run"]),
    ("--config.data.num_train=16", ["config.train.batch_size=32", "num_train=16", "<= 16"]),
    ("--config.mesh=[('data', 3)]", ["config.train.batch_size=32", "data-parallel size 3"]),
    ("--config.optim.name=adam", ["config.optim.name", "adamw", "sgd"]),
    ("--config.train.batch_size=0", ["config.train.batch_size=0", "positive"]),
    ("--config.eval.batch_size=-4", ["config.eval.batch_size=-4", "positive"]),
    ("--config.data.augment.flip_prob=1.5", ["config.data.augment.flip_prob=1.5", "[0, 1]"]),
    ("--config.checkpoint.keep=0", ["config.checkpoint.keep=0", ">= 1"]),
    ("--config.optim.b2=1.0", ["config.optim.b2=1.0", "[0, 1)"]),
    ("--config.mesh=[('data', -1), ('fsdp', -1)]", ["config.mesh", "at most one size may be -1"]),
    ("--config.log.progress=maybe", ["config.log.progress", "bool"]),
    ("--config.eval.evaluators=['nope']", ["config.eval.evaluators[0].name='nope'", "zero_shot"]),
]


@pytest.mark.parametrize("override, words", CASES, ids=[c[0].split("=")[0][9:] + "=" + c[0].split("=", 1)[1]
                                                       for c in CASES])
def test_bad_override_is_one_line_exit_2_before_any_work(tmp_path, capsys, override, words):
    rc, err, out = _train(tmp_path, capsys, override)
    assert rc == 2, (rc, err)
    assert len(err) == 1, err
    assert err[0].startswith("contrastive-jax: config error: ")
    for word in words:
        assert word in err[0], (word, err[0])
    assert "Traceback" not in err[0] and out == ""


def test_unknown_preset_lists_the_valid_ones(tmp_path, capsys):
    rc, err, _ = _train(tmp_path, capsys, spec="configs/quickstart.py:huge")
    assert rc == 2 and len(err) == 1, err
    assert "configs/quickstart.py:huge" in err[0] and "'huge'" in err[0] and "known: tiny" in err[0]


def test_missing_sentencepiece_file_is_named(tmp_path, capsys):
    missing = tmp_path / "nope.model"
    rc, err, _ = _train(tmp_path, capsys, "--config.data.tokenizer.kind=sentencepiece",
                        f"--config.data.tokenizer.path={missing}")
    assert rc == 2 and len(err) == 1, err
    assert "config.data.tokenizer.path" in err[0] and str(missing) in err[0] and "SentencePiece" in err[0]


def test_override_without_value_is_exit_2(tmp_path, capsys):
    rc, err, _ = _train(tmp_path, capsys, "--config.optim.lr")
    assert rc == 2 and len(err) == 1 and "--config.optim.lr needs a value" in err[0], err


def test_config_file_syntax_error_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(arg=None):\n    return {\n\n    oops(\n")
    rc, err, _ = _train(tmp_path, capsys, spec=str(bad))
    assert rc == 2 and len(err) == 1, err
    assert f"{bad}:" in err[0] and "syntax error" in err[0]


def test_several_problems_are_all_named_on_one_line():
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["optim.lr=-1", "loss.impl=fast"])
    message = str(info.value)
    assert "\n" not in message and "config.optim.lr" in message and "config.loss.impl" in message


def test_warmup_from_the_file_on_a_shortened_run_warns_instead(caplog):
    # quickstart:tiny's own warmup (5 steps) on a 3-step run: a smoke run, not a user error.
    cfg = load_config(TINY, ["train.total_steps=3"])
    assert cfg.train.total_steps == 3
    assert any("never reaches config.optim.lr" in r.getMessage() for r in caplog.records)


def test_valid_edge_values_are_accepted():
    cfg = load_config(TINY, ["optim.warmup_steps=20", "data.image_size=48", "mesh=[('data', 2), ('fsdp', 4)]",
                             "train.batch_size=16", "train.total_epochs=-1", "optim.weight_decay=0"])
    assert cfg.data.image_size == 48 and cfg.optim.warmup_steps == 20


def test_builder_validate_is_one_line_and_runs_the_schema_checks():
    # Notebook configs never pass through load_config: build_training's validate checks them too.
    from contrastive_jax.parallel.mesh import make_mesh
    from contrastive_jax.train.builder import validate

    cfg = default_config()
    cfg.train.batch_size = 12  # not a multiple of the 8 simulated devices
    cfg.optim.lr = -0.5
    with pytest.raises(ConfigError) as info:
        validate(cfg, make_mesh(cfg.mesh))
    message = str(info.value)
    assert "\n" not in message and "config.optim.lr=-0.5" in message
    cfg.optim.lr = 1e-3
    with pytest.raises(ConfigError, match=r"invalid config: config.train.batch_size=12 .*data-parallel size 8"):
        validate(cfg, make_mesh(cfg.mesh))


def test_dataset_smaller_than_one_batch_names_the_batch_size(tmp_path):
    # A dataset whose size the config cannot know (not 'shapes' num_*): the pipeline names the field.
    from contrastive_jax.data import build_tokenizer, make_train_iterator
    from contrastive_jax.data.config import defaults

    data = defaults()
    data.update(dict(data_dir=str(tmp_path / "d"), image_size=16, num_train=8, num_validation=2, num_test=2))
    with pytest.raises(ValueError) as info:
        make_train_iterator(data, tokenizer=build_tokenizer(data), global_batch_size=16,
                            process_index=0, process_count=1)
    message = str(info.value)
    assert "\n" not in message and "config.train.batch_size=16" in message and "(8 examples)" in message


def test_cli_subprocess_exit_2_before_setup(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "contrastive_jax.cli", "train", "--config", TINY, "--workdir",
                           str(tmp_path / "w"), f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.loss.impl=fast"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["contrastive-jax: config error: config.loss.impl='fast' is unknown; "
                                                "valid: dense, chunked, ring"]
    # Before the fix this failed after ~10 s of setup (about 2.5 s now, mostly importing jax); the
    # time is not asserted (a loaded machine), that nothing was set up is.
    assert not (tmp_path / "w").exists() and not (tmp_path / "tfds").exists()
