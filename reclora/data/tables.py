"""What a loader produces: item and user tables, and the raw interactions in file order.

Every loader maps the dataset's own ids to contiguous rows: item i is row i of `ItemTable`,
user u row u of `UserTable`, in ascending order of the raw ids. Preprocessing (preprocess.py)
turns `RawDataset` into the sample arrays the models consume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from reclora.data.parsing import Table

UNKNOWN = "unknown"


@dataclass
class ItemTable:
    """Item metadata; row i describes item id i.

    raw_ids: (I,) the dataset's own ids, ascending (int64, or str for the generic CSV format).
    titles: I titles, with the year where the dataset has it ("Toy Story (1995)").
    genre_names: G genre names. genres: (I, G) bool multi-hot.
    descriptions: I strings "title, genre, genre[, extra text]" for text embedding.
    """

    raw_ids: np.ndarray
    titles: list
    genre_names: list
    genres: np.ndarray
    descriptions: list

    def __len__(self) -> int:
        return len(self.raw_ids)

    def genres_of(self, item: int) -> list:
        return [self.genre_names[g] for g in np.flatnonzero(self.genres[item])]


@dataclass
class UserTable:
    """User attributes; row u describes user id u.

    raw_ids: (U,) the dataset's own ids, ascending.
    attribute_names: A names, e.g. ("gender", "age", "occupation", "zip"); empty when the
        dataset has no user attributes (MovieLens 25M, the generic CSV format).
    codes: (U, A) int64 categorical codes for embeddings; 0 means unknown.
    vocabularies: per attribute, the text of each code (entry 0 is "unknown"), for prompts:
        vocabularies[a][codes[u, a]] is user u's attribute a in words.
    """

    raw_ids: np.ndarray
    attribute_names: tuple
    codes: np.ndarray
    vocabularies: tuple

    def __len__(self) -> int:
        return len(self.raw_ids)

    @classmethod
    def without_attributes(cls, raw_ids: np.ndarray) -> UserTable:
        return cls.from_attributes(raw_ids, {})

    @classmethod
    def from_attributes(cls, raw_ids: np.ndarray, attributes: Mapping[str, tuple]) -> UserTable:
        """attributes: name -> (values (U,), text) as taken by `encode_categories`."""
        encoded = [encode_categories(values, text) for values, text in attributes.values()]
        codes = np.zeros((len(raw_ids), len(encoded)), dtype=np.int64)
        for column, (attribute_codes, _) in enumerate(encoded):
            codes[:, column] = attribute_codes
        return cls(np.asarray(raw_ids), tuple(attributes), codes, tuple(vocabulary for _, vocabulary in encoded))

    def vocabulary_sizes(self) -> tuple:
        return tuple(len(vocabulary) for vocabulary in self.vocabularies)

    def attributes_of(self, user: int) -> dict:
        """User `user`'s attributes in words: {"gender": "female", "age": "25-34", ...}."""
        return {
            name: vocabulary[code]
            for name, vocabulary, code in zip(self.attribute_names, self.vocabularies, self.codes[user])
        }


@dataclass
class Interactions:
    """Ratings in file order, N of them.

    user, item: (N,) int64 rows of the user and item tables. rating: (N,) float32.
    timestamp: (N,) int64 (seconds for MovieLens). label: (N,) int8 in {0, 1} when the source
    gives labels itself; None means labels come from the ratings during preprocessing.
    """

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    label: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.user)


@dataclass
class RawDataset:
    name: str
    interactions: Interactions
    items: ItemTable
    users: UserTable


def catalog_order(table: Table, column: str, what: str) -> np.ndarray:
    """The permutation that sorts a catalog file's rows by id; duplicate ids are an error."""
    ids = np.asarray(table[column])
    order = np.argsort(ids, kind="stable")
    repeated = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if len(repeated):
        row = order[repeated[0] + 1]
        raise table.error(row, f"{what} id {ids[row].item()!r} appears twice")
    return order


def lookup_ids(catalog_ids: np.ndarray, table: Table, column: str, what: str) -> np.ndarray:
    """Rows of `catalog_ids` (ascending) for the ids in `table[column]`, as (R,) int64.

    An id missing from the catalog is an error naming its line.
    """
    ids = np.asarray(table[column])
    rows = np.searchsorted(catalog_ids, ids)
    found = rows < len(catalog_ids)
    found[found] = catalog_ids[rows[found]] == ids[found]
    if not found.all():
        row = int(np.argmin(found))
        raise table.error(row, f"{what} id {ids[row].item()!r} is not in the {what} catalog")
    return rows.astype(np.int64)


def encode_categories(values: Sequence, text: Optional[Mapping | Callable] = None) -> tuple[np.ndarray, tuple]:
    """Categorical codes and their words for one attribute.

    values: (U,) raw values; codes follow their sorted order, starting at 1 (0 is "unknown";
        empty strings and values absent from a `text` mapping are unknown).
    text: maps a raw value to its words (a dict or a function); default str.
    Returns codes (U,) int64 and the vocabulary: code -> words.
    """
    values = np.asarray(values)
    distinct, inverse = np.unique(values, return_inverse=True)
    to_text = text.get if isinstance(text, Mapping) else (text or str)
    code_of_word = {UNKNOWN: 0}
    code_of_distinct = np.zeros(len(distinct), dtype=np.int64)
    for index, value in enumerate(distinct):
        word = to_text(value.item())
        if word:
            code_of_distinct[index] = code_of_word.setdefault(word, len(code_of_word))
    return code_of_distinct[inverse.reshape(-1)], tuple(code_of_word)


def genre_matrix(genre_lists: Sequence[Iterable[str]], names: Optional[list] = None) -> tuple[list, np.ndarray]:
    """Genre names (default: sorted) and the (I, G) bool multi-hot matrix for per-item genre lists."""
    names = list(names) if names is not None else sorted({genre for genres in genre_lists for genre in genres})
    column = {name: index for index, name in enumerate(names)}
    matrix = np.zeros((len(genre_lists), len(names)), dtype=bool)
    for item, genres in enumerate(genre_lists):
        matrix[item, [column[genre] for genre in genres]] = True
    return names, matrix


def describe(title: str, genres: Iterable[str], extra: Iterable[str] = ()) -> str:
    """The text an item is embedded by: "Toy Story (1995), Animation, Children's, Comedy"."""
    return ", ".join(part for part in (title, *genres, *extra) if part)


def item_table(
    raw_ids: np.ndarray, titles: list, genre_lists: list, genre_names: Optional[list] = None, extra_text: Sequence = ()
) -> ItemTable:
    """An ItemTable from per-item titles and genre lists, rows already in id order.

    genre_names: the genre order (default: sorted). extra_text: optional per-item sequences of
    further text fields for the description.
    """
    names, matrix = genre_matrix(genre_lists, genre_names)
    extra = extra_text or [()] * len(titles)
    descriptions = [describe(title, genres, more) for title, genres, more in zip(titles, genre_lists, extra)]
    return ItemTable(np.asarray(raw_ids), list(titles), names, matrix, descriptions)
