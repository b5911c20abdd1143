"""The RecLoRA (ReLLa) prompt in the backbone's chat format, tokenized with left padding.

The user message, for a movie dataset (the user sentence only where the dataset has one; the
history is the K_short retrieved behaviours, oldest first):

    The user is a female. Her job is writer. Her age is 25-34.
    The user watched the following movies in order in the past, and rated them:
    1. Toy Story (1995) (5 stars)
    2. Heat (1995) (3 stars)
    Based on the movies the user has watched, deduce if the user will like the movie ***Casino (1995)***. Note that more stars the user rated the movie, the user liked the movie more. You should ONLY tell me yes or no.

rating_format="out-of-5" writes each line as "1. Toy Story (1995): rated 5 of 5" and the note as
"Ratings go from 1 (disliked) to 5 (loved)." instead (the stars as plain numbers with their scale).

It is rendered with tokenizer.apply_chat_template(add_generation_prompt=True), so the next token
is the assistant's answer, "Yes" or "No" (reclora.readout). Prompts longer than max_length
lose their oldest history items, never the question.
"""

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Optional

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase


@dataclasses.dataclass(frozen=True)
class ItemDomain:
    """How the prompt names the items: noun, plural, and the past-tense verb for consuming one."""

    noun: str
    plural: str
    verb: str


MOVIES = ItemDomain("movie", "movies", "watched")
BOOKS = ItemDomain("book", "books", "read")
RATING_FORMATS = ("stars", "out-of-5")
OVERFLOWS = ("raise", "cut")
TOKENIZE_BLOCK = 2048  # prompts tokenized and length-sorted together (bounds the memory of token lists)


@dataclasses.dataclass(frozen=True)
class PromptInput:
    """One sample: history as (title, rating) pairs oldest first, the target title, an optional user sentence."""

    history: Sequence[tuple[str, float]]
    target: str
    user: Optional[str] = None


def describe_user(gender: str, age: str, job: str) -> str:
    """ReLLa's MovieLens user sentence: "The user is a male. His job is writer. His age is 25-34."

    gender: "F"/"M" or "female"/"male" (any case).
    """
    gender = {"f": "female", "m": "male"}.get(gender.lower(), gender.lower())
    possessive = "Her" if gender == "female" else "His"
    return f"The user is a {gender}. {possessive} job is {job}. {possessive} age is {age}."


class PromptBuilder:
    """Renders PromptInputs into chat prompts and token ids no longer than max_length."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = 1024,
        domain: ItemDomain = MOVIES,
        rating_format: str = "stars",
    ):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token (reclora.llm.load_llm sets one)")
        if rating_format not in RATING_FORMATS:
            raise ValueError(f"rating_format must be one of {RATING_FORMATS}, got {rating_format!r}")
        self.tokenizer, self.max_length, self.domain = tokenizer, max_length, domain
        self.rating_format = rating_format

    def user_message(self, sample: PromptInput, num_history: Optional[int] = None) -> str:
        """The user turn's text with the newest num_history history items (default: all)."""
        domain = self.domain
        first = 0 if num_history is None else max(0, len(sample.history) - num_history)
        kept = sample.history[first:]
        lines = [sample.user] if sample.user else []
        if kept:
            lines.append(f"The user {domain.verb} the following {domain.plural} in order in the past, and rated them:")
            lines.extend(self._history_line(k, title, rating) for k, (title, rating) in enumerate(kept, start=1))
        if self.rating_format == "stars":
            note = f"Note that more stars the user rated the {domain.noun}, the user liked the {domain.noun} more."
        else:
            note = "Ratings go from 1 (disliked) to 5 (loved)."
        lines.append(
            f"Based on the {domain.plural} the user has {domain.verb}, deduce if the user will like the "
            f"{domain.noun} ***{sample.target}***. {note} You should ONLY tell me yes or no."
        )
        return "\n".join(lines)

    def render(self, sample: PromptInput, num_history: Optional[int] = None) -> str:
        """The full chat text, ending with the assistant turn's opening."""
        message = {"role": "user", "content": self.user_message(sample, num_history)}
        return self.tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True)

    def token_ids(self, samples: Sequence[PromptInput], overflow: str = "raise") -> list[list[int]]:
        """Each sample's prompt tokens (unpadded), at most max_length long.

        All prompts are tokenized in one batch; only those too long are tokenized again.
        overflow: what a prompt still too long without any history item does: "raise" a ValueError,
        or "cut" to its last max_length tokens (for benchmarks at a fixed length).
        """
        if overflow not in OVERFLOWS:
            raise ValueError(f"overflow must be one of {OVERFLOWS}, got {overflow!r}")
        ids = self._tokenize([self.render(sample) for sample in samples])
        return [
            self._fit(sample, sample_ids, overflow) if len(sample_ids) > self.max_length else sample_ids
            for sample, sample_ids in zip(samples, ids)
        ]

    def pad(self, token_ids: Sequence[Sequence[int]], length: Optional[int] = None) -> dict[str, torch.Tensor]:
        """Left-pads to length (default: the longest): {"input_ids": (B, T) int64, "attention_mask": (B, T) int64}."""
        longest = max(len(ids) for ids in token_ids)
        if length is not None and length < longest:
            raise ValueError(f"length {length} is shorter than the longest prompt ({longest} tokens)")
        length = length or longest
        input_ids = torch.full((len(token_ids), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(token_ids), length), dtype=torch.long)
        for row, ids in enumerate(token_ids):
            input_ids[row, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, length - len(ids) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def encode(
        self, samples: Sequence[PromptInput], pad_to: Optional[int] = None, overflow: str = "raise"
    ) -> dict[str, torch.Tensor]:
        """A left-padded batch ready for the LLM: pad(token_ids(samples, overflow), pad_to)."""
        return self.pad(self.token_ids(samples, overflow), pad_to)

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        # The chat template already wrote every special token the model expects.
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _fit(self, sample: PromptInput, ids: list[int], overflow: str) -> list[int]:
        """Drops the oldest history items until the prompt fits.

        How many to drop is estimated from each history line's own token count, then checked
        by tokenizing the shortened prompt (numbering and merges across lines can shift the
        count by a token or two, in which case one more round drops more).
        """
        history_lines = [
            self._history_line(k, title, rating) + "\n" for k, (title, rating) in enumerate(sample.history, 1)
        ]
        line_lengths = [len(line_ids) for line_ids in self._tokenize(history_lines)] if history_lines else []
        num_history, full = len(sample.history), ids
        while len(ids) > self.max_length:
            if num_history == 0 and overflow == "cut":
                return full[-self.max_length :]
            if num_history == 0:
                raise ValueError(
                    f"the prompt for target {sample.target!r} has {len(ids)} tokens without any history, "
                    f"more than max_length={self.max_length}"
                )
            excess, freed = len(ids) - self.max_length, 0
            while num_history > 0 and freed < excess:
                freed += line_lengths[len(sample.history) - num_history]
                num_history -= 1
            ids = self._tokenize([self.render(sample, num_history)])[0]
        return ids

    def _history_line(self, number: int, title: str, rating: float) -> str:
        # :g writes 4.0 as 4, keeps 3.5
        if self.rating_format == "stars":
            return f"{number}. {title} ({rating:g} stars)"
        return f"{number}. {title}: rated {rating:g} of 5"


def length_sorted_batches(
    n: int, token_ids_of: Callable[[np.ndarray], list], batch_size: int, block: int = TOKENIZE_BLOCK
) -> Iterator[tuple[np.ndarray, list]]:
    """(rows, their prompts' token ids) for rows 0..n-1 in batches of at most batch_size: tokenized a
    block at a time by token_ids_of(rows) and sorted by length within it, so a left-padded batch
    carries little padding (ML-100K's prompts vary from 198 to 353 tokens: in sample order, batches
    of 32 hold 7-11% padding; sorted, under 2%). Scoring only: training batches keep their order."""
    for first in range(0, n, block):
        rows = np.arange(first, min(n, first + block))
        token_ids = token_ids_of(rows)
        order = np.argsort([len(ids) for ids in token_ids], kind="stable")
        for start in range(0, len(order), batch_size):
            picked = order[start : start + batch_size]
            yield rows[picked], [token_ids[i] for i in picked]
