"""Config schema, file loading and command-line overrides."""
import subprocess
import sys

import pytest

from contrastive_jax.train.config import ConfigError, default_config, load_config


def test_quickstart_loads_and_overrides_apply_with_field_types():
    c = load_config("configs/quickstart.py", ["optim.lr=3e-4", "train.total_steps=1e3", "log.progress=false"])
    assert c.optim.lr == pytest.approx(3e-4)
    assert c.train.total_steps == 1000 and isinstance(c.train.total_steps, int)
    assert c.log.progress is False
    # Fields the file does not set keep their defaults.
    assert c.optim.b2 == default_config().optim.b2


def test_list_override_parses_python_literals():
    c = load_config("configs/quickstart.py", ["mesh=[('data', 2), ('fsdp', 4)]"])
    assert [tuple(a) for a in c.mesh] == [("data", 2), ("fsdp", 4)]


@pytest.mark.parametrize("override, named", [("no_such_key=1", "no_such_key"), ("optim.lrr=1", "optim.lrr")])
def test_unknown_override_key_is_named(override, named):
    with pytest.raises(ConfigError, match=f"'{named}'"):
        load_config("configs/quickstart.py", [override])


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text(
        "import ml_collections\n"
        "def get_config(arg=None):\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.optim = dict(lrr=1e-3)\n"
        "    return c\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert "optim.lrr" in str(err.value) and str(path) in str(err.value)


def test_wrong_type_for_int_field_is_rejected():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config("configs/quickstart.py", ["train.batch_size=1.5"])


def test_cli_rejects_unknown_key_at_once(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "contrastive_jax.cli", "train", "--config", "configs/quickstart.py",
         "--workdir", str(tmp_path / "w"), "--config.no_such_key=1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "no_such_key" in proc.stderr
    assert not (tmp_path / "w").exists()  # failed before doing anything


def test_quickstart_is_the_five_minute_muon_recipe_and_tiny_keeps_the_plain_path():
    c = load_config("configs/quickstart.py")
    assert (c.data.image_size, c.train.batch_size, c.train.total_steps, c.eval.every_steps) == (48, 128, 600, 600)
    assert c.model.image.scan and c.model.text.remat == "dots_saveable"
    assert (c.optim.name, c.optim.no_decay, c.loss.name) == ("muon", (), "softmax")
    assert (c.optim.schedule, c.optim.decay_fraction, c.optim.end_lr_fraction) == ("wsd", 0.2, 0.0)
    assert load_config("configs/quickstart.py:adamw").optim.name == "adamw"
    tiny = load_config("configs/quickstart.py:tiny")
    assert (tiny.optim.name, tiny.optim.schedule, tiny.model.image.scan, tiny.data.cache_raw) == \
        ("adamw", "warmup_cosine", False, False)
    with pytest.raises(ValueError, match="known: tiny, adamw"):
        load_config("configs/quickstart.py:nope")
