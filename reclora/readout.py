"""Reading a click-through probability, and a training loss, off the LLM's answer logits.

The prompt (reclora.prompt) ends with the assistant turn's opening, so the logits at its last
position, (B, V), predict the answer's first token:
  P(Yes) = softmax([logit_No, logit_Yes])[1] = sigmoid(logit_Yes - logit_No)   (the CTR score)
  loss   = one of LOSSES:
    "answer-ce": cross-entropy of the answer's first token over the full vocabulary ("Yes" for a
                 positive sample, "No" for a negative), i.e. the causal-LM loss (the published one);
    "yes-no":    binary cross-entropy of P(Yes) above, the readout the metrics score;
    "both":      their sum.
The paper trains on every answer token ("Yes." and the end of turn); the tokens after the first
carry no information about the label once it is given, so only the first is trained and read.
Both are deterministic functions of the logits: with the model in eval mode, so is the score.
"""

import dataclasses

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

YES, NO = "Yes", "No"
LOSSES = ("answer-ce", "yes-no", "both")


@dataclasses.dataclass(frozen=True)
class YesNoReadout:
    """The Yes/No answer's first-token ids, and the score and loss built on them."""

    yes_id: int
    no_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> "YesNoReadout":
        readout = cls(first_answer_token(tokenizer, YES), first_answer_token(tokenizer, NO))
        if readout.yes_id == readout.no_id:
            raise ValueError(f"{YES!r} and {NO!r} start with the same token {readout.yes_id}")
        return readout

    def yes_probability(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: (B, V) at the answer position -> P(Yes): (B,) float32 in [0, 1]."""
        no_yes = logits[:, [self.no_id, self.yes_id]].float()
        return torch.softmax(no_yes, dim=-1)[:, 1]

    def answer_ids(self, labels: torch.Tensor) -> torch.Tensor:
        """labels: (B,) (bool, or 0/1 of any dtype) -> the answer token each should produce: (B,) int64."""
        yes = torch.full_like(labels, self.yes_id, dtype=torch.long)
        return torch.where(labels.bool(), yes, self.no_id)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, kind: str = "answer-ce") -> torch.Tensor:
        """The mean loss of kind (one of LOSSES) over the batch; logits (B, V), labels (B,)."""
        if kind not in LOSSES:
            raise ValueError(f"kind must be one of {LOSSES}, got {kind!r}")
        total = logits.new_zeros((), dtype=torch.float32)
        if kind in ("answer-ce", "both"):
            total = total + F.cross_entropy(logits.float(), self.answer_ids(labels))
        if kind in ("yes-no", "both"):
            margin = (logits[:, self.yes_id] - logits[:, self.no_id]).float()  # logit of P(Yes)
            total = total + F.binary_cross_entropy_with_logits(margin, labels.float())
        return total


def first_answer_token(tokenizer: PreTrainedTokenizerBase, answer: str) -> int:
    """The id of answer's first token when the assistant writes it right after the generation prompt.

    Found by tokenizing the chat template's text, so it comes out with or without a leading
    space exactly as training prompts produce it (SmolLM2: "Yes" = 10539, no space).
    """
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Will the user like it?"}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids, full_ids = tokenizer([prompt, prompt + answer], add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids or len(full_ids) == len(prompt_ids):
        raise ValueError(f"{answer!r} merges with the end of the chat template's generation prompt")
    return full_ids[len(prompt_ids)]
