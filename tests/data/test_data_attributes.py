"""The shapes dataset's third modality (``attributes``) for Symile: added without changing any
other feature."""
import hashlib

import numpy as np
import pytest

from contrastive_jax.data import shapes

# sha256 of (image bytes, caption, labels) from the 3.0.0 generator (before ``attributes``).
PINNED_3_0_0 = {
    ("train", 0): "1bdc299dd3d9f1e5004edc9ffb36f68fce676ca24c4c9caae5e7ff1bd727d608",
    ("validation", 5): "3b9c13df0970e9bd5c35ed61b169fbf8288e6213fee86848dcad153bf84affeb",
    ("test", 7): "78bbe02f77efff9360592a16df1b28f343c0ffb3222c170a6270742e0e351de0",
}


@pytest.mark.parametrize("split,index", sorted(PINNED_3_0_0))
def test_other_features_are_byte_identical_to_3_0_0(split, index):
    e = shapes.generate_example(0, split, index, 32)
    labels = bytes([e["kind"], e["color"], e["size"], e["position"], e["template_id"]])
    digest = hashlib.sha256(e["image"].tobytes() + e["caption"].encode() + labels).hexdigest()
    assert digest == PINNED_3_0_0[(split, index)]


def test_attribute_vector_encodes_the_scene():
    dim = sum(len(v) for v in shapes.ATTRIBUTES.values())
    assert shapes.ATTRIBUTE_VECTOR_DIM == dim == 18
    hits, n = 0, 200
    for i in range(n):
        e = shapes.generate_example(0, "train", i, 16 + 16)
        a = e["attributes"]
        assert a.shape == (dim,) and a.dtype == np.float32
        # Blocks in ATTRIBUTES order; with noise sigma 0.3 the argmax of a block is its label
        # unless the noise closes a gap of 1.
        off, ok = 0, True
        for attr in shapes.ATTRIBUTES:
            k = len(shapes.ATTRIBUTES[attr])
            ok &= int(np.argmax(a[off:off + k])) == e[attr]
            off += k
        hits += ok
    assert hits / n > 0.6
    res = np.concatenate([shapes.generate_example(0, "train", i, 32)["attributes"] for i in range(50)])
    onehot = np.concatenate([_onehot(shapes.generate_example(0, "train", i, 32)) for i in range(50)])
    noise = res - onehot
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - shapes.ATTRIBUTE_NOISE) < 0.03


def _onehot(e):
    return np.concatenate([np.eye(len(v), dtype=np.float32)[e[k]] for k, v in shapes.ATTRIBUTES.items()])
