"""Reading a click-through probability, and a training loss, off the LLM's answer logits.

The prompt (reclora.prompt) ends with the assistant turn's opening, so the logits at its last
position, (B, V), predict the answer's first token:
  P(Yes) = softmax([logit_No, logit_Yes])[1] = sigmoid(logit_Yes - logit_No)   (the CTR score)
  loss   = one of LOSSES:
    "answer-ce": cross-entropy of the answer's first token over the full vocabulary ("Yes" for a
                 positive sample, "No" for a negative), i.e. the causal-LM loss (the published one);
    "yes-no":    binary cross-entropy of P(Yes) above, the readout the metrics score;
    "both":      their sum;
    "yes-no-centered": "yes-no" with the gradient of the batch's mean margin scaled by
                 SHARED_MARGIN_SCALE. The loss and the score are unchanged; only the update differs.
                 Every prompt ends with the same question and chat suffix, so the margins' gradients
                 with respect to the adapters point almost the same way (SmolLM2-135M, 16 ML-100K
                 prompts: pairwise cosine 0.92-0.99, the positives' mean minus the negatives' 9% of
                 the shared part; reclora.analysis.margin_gradients). A step on "yes-no" then
                 mostly moves every margin together, by however far the batch's label mean is from
                 its mean prediction; the centred loss keeps what tells prompts apart and damps the
                 shared shift, which only calibrates. The mean is each micro-batch's (per process
                 under DDP), so --grad-accum and the process count change the update slightly.
The paper trains on every answer token ("Yes." and the end of turn); the tokens after the first
carry no information about the label once it is given, so only the first is trained and read.
Both are deterministic functions of the logits: with the model in eval mode, so is the score.

offset (optional, (B,)): a logit added to the margin before the score and the Yes/No losses. The
model passes the frozen CRM's logit there under --crm-residual, so the LLM learns what the CRM gets
wrong instead of relearning what it knows (docs/RESULTS.md, issue 16 part 5; not in the paper).
"""

import dataclasses

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

YES, NO = "Yes", "No"
LOSSES = ("answer-ce", "yes-no", "both", "yes-no-centered")
MARGIN_LOSSES = ("yes-no", "yes-no-centered")  # the losses of the margin alone (an offset can shift it)
# The trainer's default since 2026-12-03 (docs/RESULTS.md, issue 16 part 3: with it lora learns from
# its prompt, with "answer-ce", the published loss, it does not); configs/published.yaml keeps "answer-ce".
DEFAULT_LOSS = "yes-no-centered"
# The share of the batch-mean margin's gradient that "yes-no-centered" keeps: enough to calibrate
# P(Yes) over many steps, little enough that a batch's label noise does not swamp the rest.
SHARED_MARGIN_SCALE = 0.1


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

    def margin(self, logits: torch.Tensor, offset: torch.Tensor = None) -> torch.Tensor:
        """logits: (B, V) at the answer position -> logit_Yes - logit_No (+ offset): (B,) float32,
        the logit of P(Yes)."""
        margin = logits[:, self.yes_id].float() - logits[:, self.no_id].float()  # subtracted in float32, not bf16
        return margin if offset is None else margin + offset.float()

    def yes_probability(self, logits: torch.Tensor, offset: torch.Tensor = None) -> torch.Tensor:
        """logits: (B, V) at the answer position -> P(Yes): (B,) float32 in [0, 1]."""
        return torch.sigmoid(self.margin(logits, offset))

    def answer_ids(self, labels: torch.Tensor) -> torch.Tensor:
        """labels: (B,) (bool, or 0/1 of any dtype) -> the answer token each should produce: (B,) int64."""
        yes = torch.full_like(labels, self.yes_id, dtype=torch.long)
        return torch.where(labels.bool(), yes, self.no_id)

    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor, kind: str = DEFAULT_LOSS, offset: torch.Tensor = None
    ) -> torch.Tensor:
        """The mean loss of kind (one of LOSSES) over the batch; logits (B, V), labels (B,)."""
        if kind not in LOSSES:
            raise ValueError(f"kind must be one of {LOSSES}, got {kind!r}")
        if offset is not None and kind not in MARGIN_LOSSES:
            raise ValueError(
                f"an offset applies to the Yes/No margin: kind must be one of {MARGIN_LOSSES}, got {kind!r}"
            )
        total = logits.new_zeros((), dtype=torch.float32)
        if kind in ("answer-ce", "both"):
            total = total + F.cross_entropy(logits.float(), self.answer_ids(labels))
        if kind in ("yes-no", "both", "yes-no-centered"):
            margin = self.margin(logits, offset)
            if kind == "yes-no-centered":
                shared = margin.mean()
                margin = margin - (1 - SHARED_MARGIN_SCALE) * (shared - shared.detach())  # same value
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
