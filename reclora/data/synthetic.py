"""A synthetic MovieLens-like dataset, generated from a seed (no data files): the default.

It has what RecLoRA's two models can learn from:
- items: 1-3 genres (popular genres more often), a hidden quality, a popularity, a year, and a
  title built from genre word lists ("The Haunting Grave (1987)"), so titles of one genre share
  words and an LLM can read a genre off a title;
- users: gender, age, occupation, zip; a genre taste that depends partly on gender and age (so
  the attributes are informative) and drifts slowly over time, and a rating bias;
- each user rates items chosen by popularity and current taste, in sessions (several ratings in
  the same second happen, as in MovieLens);
- rating = 1 + the number of cut points below taste . genres + quality + user bias + logistic
  noise; the cut points are set where MovieLens 100K's rating distribution puts them.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from reclora.data.movielens import GENDER_TEXT, ML1M_AGE_TEXT, ML1M_OCCUPATION_TEXT
from reclora.data.source import DataSource
from reclora.data.tables import Interactions, RawDataset, UserTable, item_table

# Genre -> title words; no word belongs to two genres. Relative frequency of each genre.
GENRE_WORDS = {
    "Action": ("Fury", "Strike", "Bullet", "Mission", "Force", "Target", "Thunder", "Velocity", "Impact", "Steel"),
    "Adventure": ("Quest", "Island", "Journey", "Treasure", "Expedition", "Voyage", "Jungle", "Horizon", "Compass"),
    "Animation": ("Bunny", "Toy", "Dragon", "Kingdom", "Puppet", "Cartoon", "Wonder", "Bubble", "Rainbow"),
    "Children's": ("Kids", "Puppy", "School", "Friends", "Treehouse", "Birthday", "Pony", "Playground", "Camp"),
    "Comedy": ("Wedding", "Party", "Crazy", "Vacation", "Roommate", "Funny", "Prank", "Goofy", "Bachelor", "Mixup"),
    "Crime": ("Heist", "Gangster", "Witness", "Murder", "Street", "Cartel", "Alibi", "Robbery", "Mob", "Verdict"),
    "Documentary": ("Story", "Life", "Truth", "Inside", "Nature", "History", "Voices", "Portrait", "Chronicle"),
    "Drama": ("Heart", "Letter", "Silence", "Memory", "Family", "Winter", "River", "Promise", "Tears", "Daughter"),
    "Fantasy": ("Sword", "Wizard", "Realm", "Spell", "Enchanted", "Crown", "Sorcerer", "Legend", "Amulet"),
    "Film-Noir": ("Shadow", "Dame", "Smoke", "Rain", "Midnight", "Blackmail", "Cigarette", "Fog", "Stranger"),
    "Horror": ("Blood", "Curse", "Haunting", "Night", "Scream", "Zombie", "Grave", "Demon", "Terror", "Crypt"),
    "Musical": ("Song", "Dance", "Melody", "Broadway", "Rhythm", "Tune", "Ballroom", "Chorus", "Harmony"),
    "Mystery": ("Clue", "Riddle", "Enigma", "Vanishing", "Puzzle", "Manor", "Cipher", "Whisper", "Locket"),
    "Romance": ("Love", "Kiss", "Paris", "Valentine", "Bride", "Affair", "Summer", "Sweetheart", "Roses", "Moonlight"),
    "Sci-Fi": ("Star", "Galaxy", "Robot", "Alien", "Future", "Cyborg", "Orbit", "Android", "Nebula", "Mars"),
    "Thriller": ("Trap", "Hunt", "Panic", "Pursuit", "Conspiracy", "Deadline", "Ransom", "Stalker", "Hostage"),
    "War": ("Battle", "Soldier", "Front", "Platoon", "Bomber", "Trenches", "Victory", "Sniper", "Regiment"),
    "Western": ("Gunslinger", "Outlaw", "Saloon", "Frontier", "Sheriff", "Canyon", "Ranch", "Desperado", "Rodeo"),
}
GENRE_FREQUENCY = np.array([9, 5, 2, 3, 18, 5, 2, 24, 1, 1, 4, 2, 3, 8, 4, 9, 3, 1], dtype=float)
TITLE_PATTERNS = ("The {} {}", "{} of the {}", "{} {}", "{} and {}", "The {} of {}")

GENDER_FREQUENCY = {"M": 0.7, "F": 0.3}
AGE_FREQUENCY = {1: 0.04, 18: 0.18, 25: 0.35, 35: 0.2, 45: 0.09, 50: 0.08, 56: 0.06}

START_TIME = 874_724_710  # 1997-09-20, where MovieLens 100K starts
DURATION = 215 * 86_400  # MovieLens 100K spans about seven months
# MovieLens 100K's share of ratings 1, 2, 3, 4 (5 is the rest): the cut points reproduce it.
RATING_SHARE = np.array([0.061, 0.114, 0.271, 0.342])


@dataclasses.dataclass(frozen=True)
class SyntheticSource(DataSource):
    """Sizes are exact; every user rates at least min(20, n_ratings // n_users) items.

    drift: the standard deviation of each genre's taste change over the whole period (the
    tastes themselves spread about 1.2 across users).
    """

    name: ClassVar[str] = "synthetic"
    n_users: int = 1000
    n_items: int = 1500
    n_ratings: int = 100_000
    seed: int = 0
    drift: float = 1.0

    def __post_init__(self):
        if min(self.n_users, self.n_items) < 1 or not self.n_users <= self.n_ratings <= self.n_users * self.n_items:
            raise ValueError(
                f"need n_users >= 1, n_items >= 1 and n_users <= n_ratings <= n_users * n_items, got "
                f"{self.n_users}, {self.n_items}, {self.n_ratings}"
            )

    def read(self, progress: bool = True) -> RawDataset:
        rng = np.random.default_rng(self.seed)
        items = _Items.draw(rng, self.n_items)
        users = _Users.draw(rng, self.n_users, self.drift)
        counts = _ratings_per_user(rng, self.n_users, self.n_items, self.n_ratings)
        user, item, timestamp = _choose_items(rng, users, items, counts)
        rating = _rate(rng, users, items, user, item, timestamp)
        return RawDataset(
            self.name,
            Interactions(user, item, rating, timestamp),
            item_table(np.arange(1, self.n_items + 1), items.titles, items.genre_lists, list(GENRE_WORDS)),
            users.table,
        )


@dataclasses.dataclass
class _Items:
    genres: np.ndarray  # (I, G) float 0/1
    quality: np.ndarray  # (I,)
    log_popularity: np.ndarray  # (I,)
    titles: list
    genre_lists: list

    @classmethod
    def draw(cls, rng, n_items: int) -> _Items:
        names = list(GENRE_WORDS)
        n_genres = rng.choice([1, 2, 3], size=n_items, p=[0.5, 0.35, 0.15])
        # Gumbel top-k: each item's genres, drawn without replacement by genre frequency.
        keys = np.log(GENRE_FREQUENCY / GENRE_FREQUENCY.sum()) + rng.gumbel(size=(n_items, len(names)))
        ranked = np.argsort(-keys, axis=1)
        genres = np.zeros((n_items, len(names)))
        for item, count in enumerate(n_genres):
            genres[item, ranked[item, :count]] = 1.0
        quality = rng.normal(0.0, 0.7, n_items)
        log_popularity = rng.normal(0.0, 1.0, n_items) + 0.5 * quality
        years = 1998 - np.minimum(rng.exponential(10.0, n_items).astype(int), 68)
        genre_lists, titles = [], []
        for item in range(n_items):
            own = [names[g] for g in ranked[item, : n_genres[item]]]
            first_genre, second_genre = rng.choice(own, 2)
            first = rng.choice(GENRE_WORDS[first_genre])
            second = rng.choice([word for word in GENRE_WORDS[second_genre] if word != first])
            pattern = TITLE_PATTERNS[rng.integers(len(TITLE_PATTERNS))]
            titles.append(f"{pattern.format(first, second)} ({years[item]})")
            genre_lists.append(sorted(own, key=names.index))
        return cls(genres, quality, log_popularity, titles, genre_lists)


@dataclasses.dataclass
class _Users:
    taste: np.ndarray  # (U, G) at START_TIME
    drift: np.ndarray  # (U, G) change of taste over DURATION
    bias: np.ndarray  # (U,)
    table: UserTable

    @classmethod
    def draw(cls, rng, n_users: int, drift: float) -> _Users:
        n_genres = len(GENRE_WORDS)
        gender = rng.choice(list(GENDER_FREQUENCY), size=n_users, p=list(GENDER_FREQUENCY.values()))
        age = rng.choice(list(AGE_FREQUENCY), size=n_users, p=list(AGE_FREQUENCY.values()))
        occupation = rng.integers(0, len(ML1M_OCCUPATION_TEXT), n_users)
        zip_code = [f"{code:05d}" for code in rng.integers(0, 100_000, n_users)]
        gender_taste = {value: rng.normal(0.0, 0.6, n_genres) for value in GENDER_FREQUENCY}
        age_taste = {value: rng.normal(0.0, 0.6, n_genres) for value in AGE_FREQUENCY}
        taste = (
            rng.normal(0.0, 0.8, (n_users, n_genres))
            + np.stack([gender_taste[value] for value in gender])
            + np.stack([age_taste[value] for value in age])
        )
        table = UserTable.from_attributes(
            np.arange(1, n_users + 1),
            {
                "gender": (gender, GENDER_TEXT),
                "age": (age, ML1M_AGE_TEXT),
                "occupation": (occupation, ML1M_OCCUPATION_TEXT),
                "zip": (zip_code, None),
            },
        )
        return cls(taste, rng.normal(0.0, drift, (n_users, n_genres)), rng.normal(0.0, 0.4, n_users), table)

    def taste_at(self, user: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
        """(n, G) taste of each `user` at each `timestamp`."""
        phase = (timestamp - START_TIME) / DURATION
        return self.taste[user] + phase[:, None] * self.drift[user]


def _ratings_per_user(rng, n_users: int, n_items: int, n_ratings: int) -> np.ndarray:
    """(U,) heavy-tailed counts summing to n_ratings, each in [min(20, n_ratings // U), n_items]."""
    floor = min(20, n_ratings // n_users)
    weights = rng.lognormal(0.0, 0.8, n_users)
    counts = floor + rng.multinomial(n_ratings - floor * n_users, weights / weights.sum())
    # Nobody rates an item twice: what exceeds the catalog goes to users with room left.
    while (excess := np.maximum(counts - n_items, 0).sum()) > 0:
        counts = np.minimum(counts, n_items)
        room = n_items - counts
        counts += rng.multinomial(excess, room / room.sum())
    return counts


def _choose_items(rng, users: _Users, items: _Items, counts: np.ndarray):
    """(user, item, timestamp) arrays: each user's ratings, chronological per user."""
    n_phases = 4  # the taste that picks items is refreshed this often over a user's ratings
    user_parts, item_parts, time_parts = [], [], []
    for user, count in enumerate(counts):
        timestamps = _session_times(rng, count)
        chosen = np.zeros(len(items.quality), dtype=bool)
        picks = []
        for phase in np.array_split(np.arange(count), n_phases):
            if len(phase) == 0:
                continue
            middle = timestamps[phase[len(phase) // 2]]
            taste = users.taste_at(np.array([user]), np.array([middle]))[0]
            logits = items.log_popularity + 0.5 * (items.genres @ taste) / np.sqrt(items.genres.sum(1))
            keys = np.where(chosen, -np.inf, logits + rng.gumbel(size=len(logits)))
            pick = np.argpartition(-keys, len(phase) - 1)[: len(phase)]
            rng.shuffle(pick)
            chosen[pick] = True
            picks.append(pick)
        user_parts.append(np.full(count, user))
        item_parts.append(np.concatenate(picks))
        time_parts.append(timestamps)
    return (np.concatenate(part).astype(np.int64) for part in (user_parts, item_parts, time_parts))


def _session_times(rng, count: int) -> np.ndarray:
    """(count,) sorted timestamps in sessions of ~10 ratings; a quarter share a second."""
    joined = START_TIME + rng.uniform(0.0, 0.85) * DURATION
    active = min(rng.exponential(0.25 * DURATION) + 3600, START_TIME + DURATION - joined)
    n_sessions = max(1, round(count / rng.uniform(5, 15)))
    starts = np.sort(joined + rng.uniform(0.0, active, n_sessions))
    session = np.sort(rng.integers(0, n_sessions, count))
    gaps = np.where(rng.random(count) < 0.25, 0, rng.geometric(1 / 40, count))
    # Restart the running sum at each session's first rating.
    elapsed = np.cumsum(gaps)
    first = np.searchsorted(session, session)
    elapsed -= elapsed[first]
    return (starts[session] + elapsed).astype(np.int64)


def _rate(rng, users: _Users, items: _Items, user, item, timestamp) -> np.ndarray:
    """(N,) float32 ratings 1..5 from an ordinal logistic model."""
    taste = users.taste_at(user, timestamp)
    affinity = (taste * items.genres[item]).sum(1) / np.sqrt(items.genres[item].sum(1))
    latent = affinity + items.quality[item] + users.bias[user] + rng.logistic(0.0, 1.0, len(user))
    cut_points = np.quantile(latent, np.cumsum(RATING_SHARE))
    return (1 + np.searchsorted(cut_points, latent)).astype(np.float32)
