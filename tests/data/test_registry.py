"""contrastive_jax.data.registry: datasets by ``config.data.name`` -- registered entries, TFDS
datasets prepared on disk, and the errors for names that are neither."""
import json
import re
import shutil
import sys

import pytest

from contrastive_jax import data
from contrastive_jax.data import registry
from data_test_helpers import shapes_config, user_config


def test_registry_dispatches_by_name(shapes_cfg):
    calls = []
    entry = data.DatasetEntry(prepare=lambda c: calls.append(c) or {"train": [1, 2]},
                              vocabulary_texts=lambda c: ["hello world"])
    data.register_dataset("_test_dataset", entry)
    try:
        with pytest.raises(ValueError, match="already registered"):
            data.register_dataset("_test_dataset", entry)
        custom = shapes_config(shapes_cfg.data_dir, name="_test_dataset")
        assert data.build_dataset(custom) == {"train": [1, 2]} and calls == [custom]
        assert data.build_tokenizer(custom).vocabulary[3:] == ["hello", "world"]
    finally:
        registry._DATASETS.pop("_test_dataset")


def test_unknown_name_names_the_field_the_registered_names_and_data_convert(tmp_path):
    # The same error whether the dataset or its vocabulary is asked for first.
    for build in (data.build_dataset, data.build_tokenizer):
        with pytest.raises(ValueError, match="config.data.name") as e:
            build(user_config(tmp_path, "nope"))
        message = str(e.value)
        assert re.search(r"config.data.name='nope'.*shapes", message), message
        assert re.search(r"config.data.name='nope'.*data convert", message), message
        assert f"config.data.data_dir={tmp_path}" in message, message
    with pytest.raises(ValueError, match="config.data.name='imagenet_typo'.*shapes"):
        data.build_dataset(shapes_config(tmp_path, name="imagenet_typo"))


def test_tfrecord_dataset_needs_the_tf_extra(user_folder, tmp_path, monkeypatch):
    # Whether or not TensorFlow is installed here, the message for a missing one is shown: an
    # entry of None in sys.modules makes `import tensorflow` raise ImportError.
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    root = user_folder[0]
    shutil.copytree(root / "tfds" / "my_pics", tmp_path / "tfr_pics")
    info_path = tmp_path / "tfr_pics" / "1.0.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info["name"] = "tfr_pics"
    info_path.write_text(json.dumps(info))
    with pytest.raises(ImportError, match=r"contrastive_jax\[tf\]"):
        data.build_dataset(user_config(tmp_path, "tfr_pics"))
