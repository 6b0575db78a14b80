"""The grids logged to MLflow: tiles enlarged by nearest neighbour to a readable size, with labels."""

from __future__ import annotations

import pytest
import torch

from tasks.pictures import LABEL_PX, labelled_grid, rows_of


def test_tiles_are_enlarged_pixel_for_pixel_and_labelled_beside_and_above():
    tiles = torch.rand(2, 3, 1, 28, 28)
    grid = labelled_grid(tiles, row_labels=["T-shirt/top", "Bag"], column_labels=["original", "masked", "reconstruction"],
                         padding=4)
    scale, tile = 4, 112  # the smallest whole factor that makes 28 px at least 96 px
    top = 4 + LABEL_PX + 8
    assert grid.shape[0] == 3 and grid.shape[1] == top + 2 * (tile + 4)
    left = grid.shape[2] - 3 * (tile + 4)
    assert left > 4 + 40  # room for the row labels
    second_row_third_column = grid[0, top + tile + 4:top + 2 * tile + 4, left + 2 * (tile + 4):left + 2 * (tile + 4) + tile]
    expected = tiles[1, 2, 0].repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    torch.testing.assert_close(second_row_third_column, (expected * 255).round() / 255)
    assert grid[:, top:top + tile, :left].min() < 0.5  # a row label is drawn left of the first row
    assert grid[:, :top, left:left + tile].min() < 0.5  # a column label above the first column
    assert grid[:, :top, :left].min() == 1.0  # the corner stays white


def test_labels_that_do_not_match_the_grid_are_refused():
    with pytest.raises(ValueError, match="row_labels: 1 labels for 2 rows"):
        labelled_grid(torch.rand(2, 2, 3, 8, 8), row_labels=["only one"])
    with pytest.raises(ValueError, match=r"tiles must be \(rows, columns, 1 or 3, H, W\)"):
        labelled_grid(torch.rand(2, 3, 8, 8))


def test_rows_of_pads_the_last_row_with_white():
    rows = rows_of(torch.zeros(5, 3, 4, 4), columns=2)
    assert rows.shape == (3, 2, 3, 4, 4) and rows[2, 1].min() == 1.0 and rows[2, 0].max() == 0.0
