"""Datasets shared by several tests/data modules, built once per test process (session scope).

``shapes_*``: a small generated ``shapes`` dataset (N_TRAIN / N_VAL / N_TEST, non-default
mean/std so that normalization is visible), its records decoded once, its tokenizer.
``user_folder``: a folder of images + captions.csv (with 5 bad records) converted to the TFDS
dataset ``my_pics`` with ``test_fraction=0.25``.
"""
import pathlib

import pytest

from data_test_helpers import N_TRAIN, shapes_config, write_user_folder


# The README's end-to-end run (convert -> train -> evaluate through the CLI) is by far the longest
# test in tests/data (~35 s on 2 cores, mostly compiling). Collected in file order it would start
# after everything else and run alone at the end of a `-n 2` run; moved to the front, one
# pytest-xdist worker runs it while the other runs the rest of tests/data. Only the order changes.
_RUN_FIRST = {(pathlib.Path(__file__).parent / "test_user_data.py",
               "test_readme_path_folder_to_trained_and_evaluated_model")}


def pytest_collection_modifyitems(items):
    # Called with the whole session's items (not only tests/data's): only the tests named above move.
    first = [item for item in items if (item.path, item.name) in _RUN_FIRST]
    if first:
        items[:] = first + [item for item in items if (item.path, item.name) not in _RUN_FIRST]


@pytest.fixture(scope="session")
def shapes_cfg(tmp_path_factory):
    return shapes_config(tmp_path_factory.mktemp("tfds"), mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))


@pytest.fixture(scope="session")
def shapes_sources(shapes_cfg):
    from contrastive_jax import data

    return data.build_dataset(shapes_cfg)


@pytest.fixture(scope="session")
def shapes_records(shapes_sources):
    """All records of all splits, decoded once: {split: list of dicts}."""
    return {split: [src[i] for i in range(len(src))] for split, src in shapes_sources.items()}


@pytest.fixture(scope="session")
def shapes_tok(shapes_cfg):
    from contrastive_jax import data

    return data.build_tokenizer(shapes_cfg)


@pytest.fixture(scope="session")
def shapes_train_index(shapes_records):
    """Image bytes -> train index: identifies which example a pipeline row came from."""
    index = {r["image"].tobytes(): i for i, r in enumerate(shapes_records["train"])}
    assert len(index) == N_TRAIN  # images are unique, so identification is unambiguous
    return index


@pytest.fixture(scope="session")
def user_folder(tmp_path_factory):
    """(root, {file: bytes}, {file: captions}, conversion report) of the converted ``my_pics``."""
    from contrastive_jax.data import convert as convert_lib

    root = tmp_path_factory.mktemp("user")
    files, captions = write_user_folder(root)
    report = convert_lib.convert(str(root / "imgs"), name="my_pics", data_dir=str(root / "tfds"),
                                 captions=str(root / "captions.csv"), test_fraction=0.25,
                                 max_bad_fraction=0.2, progress=False)
    return root, files, captions, report
