"""The RecLoRA model: frozen CRM -> gate bank -> personalized LoRA in the LLM -> P(Yes).

Data flow for a batch of sample indices:
  retriever: the K_long history items most relevant to the target (CRM input) and the K_short
    ones (prompt), both chronological;
  CRM (frozen, eval mode): its last hidden layer h (B, hidden), detached; it reads the history it
    was trained on (SIM: its own top K_long of the whole history; the others: the last K_long). With
    gate_input="user-embedding" a trainable user embedding replaces h (the no-CRM ablation); with
    "uniform" every alpha is 1/K (the meta-LoRAs averaged: the no-personalization ablation);
  prompt: user attributes, the K_short behaviours with ratings, the target, the question;
  PersonalizedLLM: gates alpha = softmax(gate(h) / T) mix each slot's K meta-LoRAs; the logits
    at the answer position give P(Yes) = softmax([No, Yes])[Yes], with crm_residual
    sigmoid(logit_Yes - logit_No + the CRM's logit): the LLM then learns the CRM's residual; with
    crm_fusion sigmoid(w (logit_Yes - logit_No) + (1 - w) the CRM's logit), w = fusion_weight set
    after training (reclora.fusion): the LLM trains on its own margin.
The baselines run through the same class: "lora" (one shared LoRA, the most recent K_short items
in the prompt: TALLRec-style), "rella" (one shared LoRA, retrieved prompt), "zero-shot" (no tuning).
"""

import dataclasses

import numpy as np
import torch
from torch import nn

from reclora.adapters import AdapterConfig, PersonalizedLLM
from reclora.crm.features import CrmInputs
from reclora.data import RecDataset
from reclora.fusion import fused_logit
from reclora.llm import last_token_logits
from reclora.methods import GATE_INPUTS, LLM_METHODS, method
from reclora.prompt import PromptBuilder, PromptInput, describe_user
from reclora.readout import DEFAULT_LOSS, YesNoReadout
from reclora.retriever import LongShortRetriever


class RecLoRAModel(nn.Module):
    def __init__(
        self,
        method,
        dataset: RecDataset,
        llm,
        tokenizer,
        retriever: LongShortRetriever,
        crm=None,
        crm_inputs: CrmInputs = None,
        adapter_config: AdapterConfig = None,
        max_prompt_length=1024,
        gate_input="crm",
        loss=DEFAULT_LOSS,
        rating_format="stars",
        crm_residual=False,
        crm_fusion=False,
    ):
        """crm / crm_inputs: the trained CRM and its batch builder (reclora with gate_input "crm").

        retriever: its strategy decides the prompt's history ("recent" for lora, "semantic" for
        reclora and rella).
        gate_input: "crm" (the paper), or "user-embedding": a trainable (n_users, gate_input_dim)
        embedding feeds the gates instead, the ablation that removes the CRM's knowledge, or
        "uniform": no gates, every alpha 1/K, the ablation that removes personalization.
        loss: the training loss, one of reclora.readout.LOSSES.
        rating_format: how the prompt writes a rating, one of reclora.prompt.RATING_FORMATS.
        crm_residual: the readout adds the frozen CRM's logit to the Yes/No margin (any tuned method).
        crm_fusion: the readout weighs the margin against the frozen CRM's logit by fusion_weight (any
        tuned method; None until the trainer chooses it on validation, and the LLM alone until then).
        """
        super().__init__()
        row = _llm_method(method)
        if gate_input not in GATE_INPUTS:
            raise ValueError(f"gate_input must be one of {GATE_INPUTS}, got {gate_input!r}")
        for name, asked in (("crm_residual", crm_residual), ("crm_fusion", crm_fusion)):
            if asked and not row.tuned:
                raise ValueError(f"{name} needs a tuned method; {row.name!r} tunes nothing")
        if crm_residual and crm_fusion:
            raise ValueError("crm_residual and crm_fusion are two readouts of the CRM's logit: pick one")
        uses_crm = row.needs_crm(gate_input, crm_residual or crm_fusion)
        if uses_crm and (crm is None or crm_inputs is None):
            raise ValueError(
                f"method {row.name!r} needs a trained crm and its crm_inputs (or gate_input='user-embedding' "
                "and neither crm_residual nor crm_fusion)"
            )
        self.method, self.dataset, self.retriever, self.crm_inputs = row.name, dataset, retriever, crm_inputs
        self.row, self.gate_input, self.loss_kind, self.crm_residual = row, gate_input, loss, crm_residual
        self.crm_fusion, self.fusion_weight = crm_fusion, None
        self.crm = crm.eval().requires_grad_(False) if uses_crm else None
        self.user_embedding = None
        if not row.tuned:
            llm.requires_grad_(False)
            self.llm = llm
        else:
            config = adapter_config or AdapterConfig()
            if not row.gated:
                config = dataclasses.replace(config, num_loras=1, gated=False)
            elif gate_input == "uniform":
                config = dataclasses.replace(config, uniform_gate=True)
            self.llm = PersonalizedLLM(llm, config)
            if row.gated and gate_input == "user-embedding":
                self.user_embedding = nn.Embedding(dataset.n_users, config.gate_input_dim, device=llm.device)
        self.prompts = PromptBuilder(tokenizer, max_length=max_prompt_length, rating_format=rating_format)
        self.readout = YesNoReadout.from_tokenizer(tokenizer)

    def train(self, mode=True):
        super().train(mode)
        if self.crm is not None:
            self.crm.eval()  # frozen: no dropout, deterministic representation
        return self

    @property
    def backbone(self) -> nn.Module:
        """The causal LM itself (inside its adapters when the method tunes it)."""
        return self.llm.llm if isinstance(self.llm, PersonalizedLLM) else self.llm

    @property
    def device(self):
        return next(self.llm.parameters()).device

    def prepare(self, samples, token_ids=None) -> dict:
        """Tensors for a batch of sample indices: prompts, CRM inputs, labels (on the model's device).
        token_ids: the samples' prompt tokens when already made (prompt_token_ids)."""
        samples = np.asarray(samples, dtype=np.int64)
        token_ids = self.prompt_token_ids(samples) if token_ids is None else token_ids
        batch = {name: t.to(self.device) for name, t in self.prompts.pad(token_ids).items()}
        batch["label"] = torch.from_numpy(self.dataset.samples.label[samples].astype(np.float32)).to(self.device)
        batch.update(self.gate_batch(samples))
        return batch

    def prompt_token_ids(self, samples) -> list[list[int]]:
        """Each sample's prompt tokens, unpadded (prepare pads them; inference sorts them by length first)."""
        samples = np.asarray(samples, dtype=np.int64)
        retrieved = self.retriever.retrieve(samples)
        return self.prompts.token_ids([self._prompt(s, retrieved.short, row) for row, s in enumerate(samples)])

    def gate_batch(self, samples) -> dict:
        """The gates' inputs for a batch of sample indices: the CRM's ("crm") or the user ids ("user")."""
        samples = np.asarray(samples, dtype=np.int64)
        if self.crm is not None:
            return {"crm": self.crm_inputs.batch(samples, self.device)}
        if self.user_embedding is not None:
            return {"user": torch.from_numpy(self.dataset.samples.user[samples]).to(self.device)}
        return {}

    def crm_hidden(self, batch):
        """The frozen CRM's last hidden layer, (B, hidden), where the gates or the readout (residual or
        fused) read it; else None. Computed once a batch and shared by both."""
        if not (self.row.gates_read_crm(self.gate_input) or self.crm_residual or self.crm_fusion):
            return None
        with torch.no_grad():
            return self.crm.represent(batch["crm"])

    def gate_features(self, batch, crm_hidden=None) -> torch.Tensor:
        """What the gates read, (B, gate_input_dim): the frozen CRM's last hidden layer (crm_hidden when
        given) or the user embedding; (B, 0) for the uniform gate, which reads only B; None for the
        methods without gates."""
        if self.row.gates_read_crm(self.gate_input):
            return self.crm_hidden(batch) if crm_hidden is None else crm_hidden
        if self.user_embedding is not None:
            users = batch["user"]
            known = users < self.user_embedding.num_embeddings
            embedded = self.user_embedding(torch.where(known, users, 0))
            # A user added after training (cold start, at inference) reads the mean user.
            return torch.where(known[:, None], embedded, self.user_embedding.weight.mean(0))
        if self.row.gated and self.gate_input == "uniform":
            return torch.zeros(batch["input_ids"].shape[0], 0, device=self.device)
        return None

    def _prompt(self, sample, short, row) -> PromptInput:
        items, n = self.dataset.items, int(short.lengths[row])
        history = [
            (items.titles[i], float(r))
            for i, r in zip(short.item_ids[row, :n].tolist(), short.ratings[row, :n].tolist())
        ]
        return PromptInput(history, items.titles[self.dataset.samples.item[sample]], self._user_sentence(sample))

    def _user_sentence(self, sample):
        users, user = self.dataset.users, int(self.dataset.samples.user[sample])
        if not {"gender", "age", "occupation"} <= set(users.attribute_names) or not users.codes[user].any():
            return None  # no attributes, or none known (a cold-start user)
        words = users.attributes_of(user)
        return describe_user(words["gender"], words["age"], words["occupation"])

    def forward(self, batch) -> torch.Tensor:
        """Next-token logits at the answer position: (B, V)."""
        return self.answer(batch)[0]

    def answer(self, batch) -> tuple:
        """The answer position's logits (B, V) and the frozen CRM's logit (B,) float32 where the readout
        reads it (crm_residual or crm_fusion), else None."""
        if not self.row.tuned:
            return last_token_logits(self.llm, batch["input_ids"], batch["attention_mask"]), None
        crm_hidden = self.crm_hidden(batch)
        logits = self.llm(
            batch["input_ids"], batch["attention_mask"], gate_features=self.gate_features(batch, crm_hidden)
        )
        reads_crm = self.crm_residual or self.crm_fusion
        return logits, self.crm.logit_from(crm_hidden).float() if reads_crm else None

    def readout_logits(self, batch) -> tuple:
        """(the LLM's margin, (B,) float32, with the CRM's logit added under crm_residual; the CRM's
        logit (B,) under crm_fusion, else None): what yes_probability combines."""
        logits, crm_logit = self.answer(batch)
        if self.crm_residual:
            return self.readout.margin(logits, crm_logit), None
        return self.readout.margin(logits), crm_logit

    def yes_probability(self, batch) -> torch.Tensor:
        """P(Yes) per sample: (B,) float32."""
        margin, crm_logit = self.readout_logits(batch)
        if crm_logit is None or self.fusion_weight is None:
            return torch.sigmoid(margin)
        return torch.sigmoid(fused_logit(margin, crm_logit, self.fusion_weight))

    def loss(self, batch) -> torch.Tensor:
        """The training loss (self.loss_kind) of the answer logits against the labels; under crm_fusion
        the LLM's margin alone."""
        logits, crm_logit = self.answer(batch)
        return self.readout.loss(logits, batch["label"], self.loss_kind, crm_logit if self.crm_residual else None)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def gate_parameters(self):
        """The trainable parameters that decide alpha (the gate bank, the user embedding): the rest are LoRAs."""
        modules = (getattr(self.llm, "gate_bank", None), self.user_embedding)  # the LLM of zero-shot has no gate bank
        return [p for module in modules if module is not None for p in module.parameters() if p.requires_grad]


def _llm_method(name: str):
    if name not in LLM_METHODS:
        raise ValueError(f"method must be one of {list(LLM_METHODS)}, got {name!r}")
    return method(name)
