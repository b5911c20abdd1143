"""The generic format: an interactions CSV and an items CSV with configurable column names.

interactions file: one row per interaction with user id, item id, a rating and/or a 0/1 label,
and an integer timestamp (any unit; only the order matters). items file: item id, a title, and
optionally a genre list and further text fields for the item description. Ids may be any
strings. There is no user file: users have no attributes.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import numpy as np

from reclora.data.parsing import read_table
from reclora.data.source import DirectorySource
from reclora.data.tables import Interactions, RawDataset, UserTable, catalog_order, item_table, lookup_ids


@dataclasses.dataclass(frozen=True)
class CsvSource(DirectorySource):
    """data_dir holds `interactions_file` and `items_file`; the other fields name their columns.

    rating_column / label_column: at least one; labels given here override the rating threshold,
    and without a rating column the label stands in for the rating in histories.
    genres_column: optional, genres joined by `genre_separator`. text_columns: further item
    fields appended to the description.
    """

    name: ClassVar[str] = "csv"
    interactions_file: str = "interactions.csv"
    items_file: str = "items.csv"
    user_column: str = "user"
    item_column: str = "item"
    rating_column: Optional[str] = "rating"
    label_column: Optional[str] = None
    timestamp_column: str = "timestamp"
    item_id_column: str = "item"
    title_column: str = "title"
    genres_column: Optional[str] = "genres"
    genre_separator: str = "|"
    text_columns: tuple = ()
    delimiter: str = ","
    encoding: str = "utf-8"

    def __post_init__(self):
        if self.rating_column is None and self.label_column is None:
            raise ValueError("the csv format needs a rating_column or a label_column")
        object.__setattr__(self, "text_columns", tuple(self.text_columns))

    @property
    def file_names(self) -> tuple:
        return (self.interactions_file, self.items_file)

    def read(self, progress: bool = True) -> RawDataset:
        csv_format = dict(separator=self.delimiter, quoted=True, header=True, encoding=self.encoding)
        item_columns = {"id": (self.item_id_column, str), "title": (self.title_column, str)}
        if self.genres_column is not None:
            item_columns["genres"] = (self.genres_column, str)
        item_columns.update({f"text {column}": (column, str) for column in self.text_columns})
        items = read_table(self.path(self.items_file), item_columns, **csv_format)

        interaction_columns = {"user": (self.user_column, str), "item": (self.item_column, str)}
        interaction_columns["timestamp"] = (self.timestamp_column, np.int64)
        if self.rating_column is not None:
            interaction_columns["rating"] = (self.rating_column, np.float32)
        if self.label_column is not None:
            interaction_columns["label"] = (self.label_column, np.int8)
        interactions = read_table(
            self.path(self.interactions_file), interaction_columns, progress=progress, **csv_format
        )

        labels = None
        if self.label_column is not None:
            labels = interactions["label"]
            bad = np.flatnonzero((labels != 0) & (labels != 1))
            if len(bad):
                raise interactions.error(bad[0], f"label {int(labels[bad[0]])} is not 0 or 1")
        ratings = interactions["rating"] if self.rating_column is not None else labels.astype(np.float32)

        order = catalog_order(items, "id", "item")
        genre_fields = items["genres"] if self.genres_column is not None else [""] * len(items)
        genre_lists = [[genre for genre in genre_fields[row].split(self.genre_separator) if genre] for row in order]
        extra_text = [[items[f"text {column}"][row] for column in self.text_columns] for row in order]
        item_ids = np.asarray(items["id"])[order]
        catalog = item_table(item_ids, [items["title"][row] for row in order], genre_lists, extra_text=extra_text)
        users = UserTable.without_attributes(np.unique(np.asarray(interactions["user"])))
        return RawDataset(
            self.name,
            Interactions(
                lookup_ids(users.raw_ids, interactions, "user", "user"),
                lookup_ids(catalog.raw_ids, interactions, "item", "item"),
                ratings,
                interactions["timestamp"],
                labels,
            ),
            catalog,
            users,
        )
