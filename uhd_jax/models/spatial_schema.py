"""The spatial schema (spec uhd.md §3): how one image's slice and overview tokens are laid out in the LLM sequence.

Computed on the host: a layout is a list of positions, each either a row of the sample's flattened image features
(`row >= 0`) or a separator text token (`row == -1`, its `token_id` embedded by the LLM's own embedding table, so
the ',' and '\\n' vectors train with the LLM as in the original). Labels of every position here are ignored.

  v1   (v1-ECCV, v2-head):   slice tokens then ',' or '\\n' after each slice, overview last: 145k + 144 positions
  grid (v2-dec2024):         the slices' 12x12 token grids stitched into one (rows*12) x (cols*12) grid with '\\n'
                             after every token row, then the first separator, then the overview
"""
from __future__ import annotations

import numpy as np

SCHEMAS = ("v1", "grid")
VICUNA_SEPARATOR_IDS = {",": 29892, "\n": 13}


def image_layout(grid: tuple[int, int] | None, separators: list[str], *, query_grid: int = 12, schema: str = "v1",
                 separator_ids: dict | None = None, first_row: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(token_ids, feature_rows) of one image. Features of the image are its slices (row-major) then its overview,
    `query_grid^2` rows each, starting at `first_row` of the sample's flattened image features."""
    if schema not in SCHEMAS:
        raise ValueError(f"unknown spatial schema {schema!r}; choose one of {SCHEMAS}")
    sep = VICUNA_SEPARATOR_IDS if separator_ids is None else separator_ids
    per = query_grid * query_grid
    k = len(separators)
    ids, rows = [], []

    def image_rows(index):
        start = first_row + index * per
        ids.extend([0] * per)
        rows.extend(range(start, start + per))

    if k == 0 or schema == "v1":
        for s in range(k):
            image_rows(s)
            ids.append(sep[separators[s]])
            rows.append(-1)
    else:
        cols, n_rows = grid
        newline = sep["\n"]
        for r in range(n_rows):
            for a in range(query_grid):          # token row a of slice row r
                for c in range(cols):
                    s = r * cols + c
                    start = first_row + s * per + a * query_grid
                    ids.extend([0] * query_grid)
                    rows.extend(range(start, start + query_grid))
                ids.append(newline)
                rows.append(-1)
        ids.append(sep[separators[0]])
        rows.append(-1)
    image_rows(k)                                # the overview, last
    return np.asarray(ids, np.int32), np.asarray(rows, np.int32)


def image_token_count(grid: tuple[int, int] | None, *, query_grid: int = 12, schema: str = "v1") -> int:
    per = query_grid * query_grid
    if grid is None:
        return per
    cols, rows = grid
    if schema == "v1":
        return (per + 1) * cols * rows + per
    return rows * query_grid * (cols * query_grid + 1) + 1 + per
