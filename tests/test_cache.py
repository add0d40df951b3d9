"""A damaged slice cache is noticed and rebuilt, never read as garbage or shown as a traceback."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from brainseg.data.index import scan
from brainseg.data.io import read_image
from conftest import make_kaggle_tree

PATIENT = "TCGA_AA_0001_19990101"


def cut_in_half(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "images cut short": lambda d: cut_in_half(d / "images.u8"),
    "masks cut short": lambda d: cut_in_half(d / "masks.u8"),
    "images missing": lambda d: (d / "images.u8").unlink(),
    "offsets not numpy": lambda d: (d / "offsets.npy").write_bytes(b"\x93NUMPY garbage"),
    "offsets of the wrong shape": lambda d: np.save(d / "offsets.npy", np.zeros((2, 5), np.int64)),
    "empty index": lambda d: (d / "index.csv").write_text(""),
    "index of other rows": lambda d: (d / "index.csv").write_text("patient,slice,image_path\nX,1,x.tif\n"),
    "manifest a list": lambda d: (d / "manifest.json").write_text("[]"),
    "manifest without problems": lambda d: (d / "manifest.json").write_text(
        (d / "manifest.json").read_text().replace('"problems"', '"other"')),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_cache_is_rebuilt(tmp_path, isolated_cache, damage):
    root = make_kaggle_tree(tmp_path / "data", {PATIENT: 4})
    first = scan(root)
    (directory,) = [p.parent for p in isolated_cache.rglob("manifest.json")]
    damage(directory)

    again = scan(root)
    assert not again.from_cache
    pd.testing.assert_frame_equal(again.table, first.table)
    image_path = root / PATIENT / f"{PATIENT}_3.tif"
    np.testing.assert_array_equal(again.store.image(str(image_path)), read_image(image_path))
    assert scan(root).from_cache  # and the rebuilt cache is whole again
