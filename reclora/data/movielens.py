"""MovieLens 100K, 1M, 25M and latest, read from the directories GroupLens distributes.

The files are never shipped with this package (GroupLens forbids redistribution): point
`load_dataset` at a directory holding them.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from reclora.data.parsing import Table, read_table
from reclora.data.source import DirectorySource
from reclora.data.tables import (
    Interactions,
    ItemTable,
    RawDataset,
    UserTable,
    catalog_order,
    item_table,
    lookup_ids,
)

LATIN1 = "latin-1"  # the 100K and 1M files predate UTF-8 ("Misérables" is one byte there)

GENDER_TEXT = {"M": "male", "F": "female"}

# From the ML-1M README: users.dat stores codes for these.
ML1M_AGE_TEXT = {1: "under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56+"}
ML1M_OCCUPATION_TEXT = {
    0: "other",
    1: "academic/educator",
    2: "artist",
    3: "clerical/admin",
    4: "college/grad student",
    5: "customer service",
    6: "doctor/health care",
    7: "executive/managerial",
    8: "farmer",
    9: "homemaker",
    10: "K-12 student",
    11: "lawyer",
    12: "programmer",
    13: "retired",
    14: "sales/marketing",
    15: "scientist",
    16: "self-employed",
    17: "technician/engineer",
    18: "tradesman/craftsman",
    19: "unemployed",
    20: "writer",
}

RATING_COLUMNS = {"user": (0, np.int64), "item": (1, np.int64), "rating": (2, np.float32), "timestamp": (3, np.int64)}


@dataclasses.dataclass(frozen=True)
class MovieLens100K(DirectorySource):
    name: ClassVar[str] = "ml-100k"
    file_names: ClassVar[tuple] = ("u.data", "u.item", "u.user", "u.genre")

    def read(self, progress: bool = True) -> RawDataset:
        genre_file = read_table(
            self.path("u.genre"), {"name": (0, str), "flag": (1, np.int64)}, separator="|", n_fields=2, encoding=LATIN1
        )
        genre_names = [genre_file["name"][i] for i in np.argsort(genre_file["flag"], kind="stable")]
        flag_columns = {f"genre {g}": (5 + g, np.int8) for g in range(len(genre_names))}
        movies = read_table(
            self.path("u.item"),
            {"id": (0, np.int64), "title": (1, str), **flag_columns},
            separator="|",
            n_fields=5 + len(genre_names),
            encoding=LATIN1,
        )
        flags = np.stack([movies[name] for name in flag_columns], axis=1).astype(bool)
        genre_lists = [[genre_names[g] for g in np.flatnonzero(row)] for row in flags]
        users = read_table(
            self.path("u.user"),
            {"id": (0, np.int64), "age": (1, np.int64), "gender": (2, str), "occupation": (3, str), "zip": (4, str)},
            separator="|",
            n_fields=5,
            encoding=LATIN1,
        )
        ratings = read_table(
            self.path("u.data"), RATING_COLUMNS, separator="\t", n_fields=4, encoding=LATIN1, progress=progress
        )
        user_table = _user_table(users, {"gender": GENDER_TEXT, "age": None, "occupation": None, "zip": None})
        return _assemble(self.name, ratings, _movie_table(movies, genre_lists, genre_names), user_table)


@dataclasses.dataclass(frozen=True)
class MovieLens1M(DirectorySource):
    name: ClassVar[str] = "ml-1m"
    file_names: ClassVar[tuple] = ("ratings.dat", "movies.dat", "users.dat")

    def read(self, progress: bool = True) -> RawDataset:
        movies = read_table(
            self.path("movies.dat"),
            {"id": (0, np.int64), "title": (1, str), "genres": (2, str)},
            separator="::",
            n_fields=3,
            encoding=LATIN1,
        )
        users = read_table(
            self.path("users.dat"),
            {
                "id": (0, np.int64),
                "gender": (1, str),
                "age": (2, np.int64),
                "occupation": (3, np.int64),
                "zip": (4, str),
            },
            separator="::",
            n_fields=5,
            encoding=LATIN1,
        )
        ratings = read_table(
            self.path("ratings.dat"), RATING_COLUMNS, separator="::", n_fields=4, encoding=LATIN1, progress=progress
        )
        user_table = _user_table(
            users, {"gender": GENDER_TEXT, "age": ML1M_AGE_TEXT, "occupation": ML1M_OCCUPATION_TEXT, "zip": None}
        )
        return _assemble(self.name, ratings, _movie_table(movies, _split_genres(movies["genres"])), user_table)


@dataclasses.dataclass(frozen=True)
class MovieLensCsv(DirectorySource):
    """MovieLens 25M, 20M and the `latest` releases: quoted UTF-8 CSV with headers, no user data."""

    name: ClassVar[str] = "ml-25m"
    file_names: ClassVar[tuple] = ("ratings.csv", "movies.csv")

    def read(self, progress: bool = True) -> RawDataset:
        csv_format = dict(separator=",", quoted=True, header=True, encoding="utf-8")
        movies = read_table(
            self.path("movies.csv"),
            {"id": ("movieId", np.int64), "title": ("title", str), "genres": ("genres", str)},
            **csv_format,
        )
        ratings = read_table(
            self.path("ratings.csv"),
            {
                "user": ("userId", np.int64),
                "item": ("movieId", np.int64),
                "rating": ("rating", np.float32),
                "timestamp": ("timestamp", np.int64),
            },
            progress=progress,
            **csv_format,
        )
        users = UserTable.without_attributes(np.unique(ratings["user"]))
        return _assemble(self.name, ratings, _movie_table(movies, _split_genres(movies["genres"])), users)


@dataclasses.dataclass(frozen=True)
class MovieLensLatest(MovieLensCsv):
    name: ClassVar[str] = "ml-latest"


def _split_genres(fields: list) -> list:
    # "(no genres listed)" is how the CSV releases spell an empty list.
    return [[] if field in ("", "(no genres listed)") else field.split("|") for field in fields]


def _movie_table(movies: Table, genre_lists: list, genre_names=None) -> ItemTable:
    order = catalog_order(movies, "id", "movie")
    return item_table(
        movies["id"][order],
        [movies["title"][row].strip() for row in order],
        [genre_lists[row] for row in order],
        genre_names,
    )


def _user_table(users: Table, text_of: dict) -> UserTable:
    order = catalog_order(users, "id", "user")
    return UserTable.from_attributes(
        users["id"][order], {name: (np.asarray(users[name])[order], text) for name, text in text_of.items()}
    )


def _assemble(name: str, ratings: Table, items: ItemTable, users: UserTable) -> RawDataset:
    interactions = Interactions(
        user=lookup_ids(users.raw_ids, ratings, "user", "user"),
        item=lookup_ids(items.raw_ids, ratings, "item", "movie"),
        rating=ratings["rating"],
        timestamp=ratings["timestamp"],
    )
    return RawDataset(name, interactions, items, users)
