"""Pictures (runtime/images.py, self_discovery/montage.py, pytorch/preview.py): PNG files
written with Pillow, labelled grids whose tiles are the enlarged middle slices, text that
fits, a class montage and the pretraining preview."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pytorch.data import PretrainingCubes
from pytorch.engine import LossConfig, build_model
from pytorch.preview import preview_rows, restoration_preview
from runtime.images import (TILE_PX, _font, labelled_grid, save_png,
                            tile_scale, wrap_text)
from self_discovery.discovery import ClassPlan, CubeSpec
from self_discovery.montage import class_montage, montage_rows, reconstruction_grid


def _cubes(n: int, shape=(16, 12, 6), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random(shape, dtype=np.float32) for _ in range(n)]


def _u8(a: np.ndarray) -> np.ndarray:
    return (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)


# ------------------------------------------------------------------------------- save_png
@pytest.mark.parametrize("shape,mode", [((5, 7), "L"), ((5, 7, 3), "RGB")])
def test_save_png_round_trips_through_pillow(tmp_path, shape, mode):
    img = np.random.default_rng(1).random(shape).astype(np.float32) * 1.2 - 0.1   # clipped
    path = save_png(tmp_path / "sub" / "a.png", img)
    with Image.open(path) as im:
        assert (im.format, im.mode, im.size) == ("PNG", mode, (7, 5))
        np.testing.assert_array_equal(np.asarray(im), _u8(img))
    assert [p.name for p in path.parent.iterdir()] == ["a.png"]   # no temporary file left


def test_save_png_refuses_other_shapes_and_keeps_the_old_file(tmp_path):
    path = save_png(tmp_path / "a.png", np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"\(H, W\) or \(H, W, 3\)"):
        save_png(path, np.zeros((2, 2, 4)))
    with Image.open(path) as im:
        assert im.size == (2, 2)


# ------------------------------------------------------------------------------- grids
def test_labelled_grid_tiles_are_enlarged_middle_slices():
    cubes = _cubes(3)
    grid = labelled_grid([cubes[:2], cubes[2:]], title="t", col_labels=["a", "b"],
                         row_labels=["r1", "r2"], caption="c")
    k = tile_scale(12)
    assert k == 11 and 12 * k >= TILE_PX
    boxes = [b for row in grid.tiles for b in row]
    assert len(boxes) == 3
    for cube, (top, left, h, w) in zip(cubes, boxes):
        assert (h, w) == (12 * k, 16 * k)   # y down, x across
        expected = np.kron(cube[:, :, 3].T, np.ones((k, k), np.float32))
        np.testing.assert_array_equal(_u8(grid.image[top:top + h, left:left + w]), _u8(expected))
    assert grid.image.dtype == np.float32 and 0 <= grid.image.min() <= grid.image.max() <= 1


def test_labelled_grid_draws_its_text_where_it_says():
    cubes = _cubes(2)
    bare = labelled_grid([cubes])
    full = labelled_grid([cubes], title="A title", col_labels=["input", "output"],
                         row_labels=["row one"], tile_labels=[["p001", "p002"]],
                         caption="What the rows and columns are.")
    (top, left, h, w), _ = full.tiles[0]
    assert full.image[:top, :].min() < 0.5            # title and headers above the tiles
    assert full.image[top:top + h, :left].min() < 0.5  # the row label left of them
    assert full.image[top + h:, :].min() < 0.5         # tile labels and caption below
    assert full.image.shape[0] > bare.image.shape[0]
    assert bare.image[:bare.tiles[0][0][0], :].min() == 1.0   # no text: white


def test_wrap_text_fits_the_width_and_keeps_every_word():
    font = _font(13)
    text = "Rows: train cubes at resolutions 1-3\nand a_very_long_file_name_without_spaces.npy"
    lines = wrap_text(text, 90, font)
    assert all(font.getlength(x) <= 90 for x in lines)
    assert "".join(lines).replace(" ", "") == text.replace("\n", "").replace(" ", "")
    assert wrap_text("a\nb", 500, font) == ["a", "b"]


# ------------------------------------------------------------------------------- montage
def test_class_montage_rows_in_order_with_patient_names():
    keys = [("validation", 1), ("train", 3), ("train", 1), ("train", 2)]
    assert montage_rows(keys) == [("train", 1), ("train", 2), ("train", 3), ("validation", 1)]
    specs = [CubeSpec("train", r, f"train/p{i}.npy", 1, 2, 3, (16, 12, 6) if r == 1 else (20, 20, 6))
             for r in (1, 2) for i in (4, 7)]
    specs.append(CubeSpec("validation", 1, "validation/v0.npy", 1, 2, 3, (16, 12, 6)))
    plan = ClassPlan(5, "train/p4.npy", (1, 2, 3), specs)
    cubes = _cubes(5)
    by_key = {("validation", 1): cubes[4:], ("train", 2): cubes[2:4], ("train", 1): cubes[:2]}
    grid = class_montage(plan, by_key, (16, 12, 6))
    assert [len(r) for r in grid.tiles] == [2, 2, 1]
    top, left, h, w = grid.tiles[2][0]            # the validation row comes last
    np.testing.assert_array_equal(_u8(grid.image[top:top + h, left:left + w]),
                                  _u8(np.kron(cubes[4][:, :, 3].T, np.ones((11, 11)))))
    assert min(h, w) >= TILE_PX


def test_reconstruction_grid_has_two_columns_per_volume():
    vols = [torch.rand(16, 16, 8) for _ in range(4)]
    img = reconstruction_grid([vols[:2], vols[2:]])
    assert img.ndim == 2 and img.shape[0] > 2 * TILE_PX and img.shape[1] > 2 * TILE_PX


# ------------------------------------------------------------------------------- preview
def test_preview_shows_one_cube_per_transformation_first():
    choices = torch.tensor([2, 2, 0, 3, 1, 0, -1])
    assert preview_rows(choices, 4) == [2, 4, 0, 3]
    assert preview_rows(choices, 6) == [2, 4, 0, 3, 1, 5]
    assert preview_rows(torch.full((5,), -1), 2) == [0, 1]


def test_restoration_preview_keeps_the_model_mode():
    torch.manual_seed(0)
    model = build_model("en_de", 2, width=2)
    model.train()
    cubes = torch.rand(4, 2, 16, 16, 8)
    val = PretrainingCubes(cubes, torch.tensor([0, 0, 1, 1]))
    img = restoration_preview(model, val, torch.tensor([1, 0, 3, 2]), 4, torch.device("cpu"),
                              None, LossConfig("en_de"))
    assert model.training
    assert img.shape[0] > 4 * TILE_PX and img.shape[1] > 3 * TILE_PX
