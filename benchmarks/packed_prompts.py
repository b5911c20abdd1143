"""`python -m benchmarks.packed_prompts`: padded length-sorted batches against packed tokens, for inference.

  python -m benchmarks.packed_prompts [--llm smollm2-135m] [--prompts 32] [--batch-size 8]
                                      [--min-tokens 200] [--max-tokens 300] [--repeats 3] [--json OUT.json]

The decision behind reclora.inference: gated_lora_linear can run packed tokens (sample_index,
no padding), but the rest of the LLM must then run the prompts as one packed row. Both ways run
the transformer body (what differs; the LoRA and vocabulary work is the same per real token) on
the same prompts (random token ids, lengths drawn uniformly in [--min-tokens, --max-tokens],
sorted by length as reclora.inference sorts them):
  padded  --batch-size prompts per batch, left-padded to the longest, attention mask
  packed  the same prompts of a batch concatenated into one row, positions restarting per
          prompt and no attention mask (transformers then builds the block-diagonal mask)
The paths alternate, --repeats times each; medians are reported.
"""

import argparse
import statistics
import time

import numpy as np
import torch

from benchmarks.environment import describe
from reclora.files import write_json
from reclora.llm import SMOLLM2, load_llm, position_ids


def padded(body, prompts):
    length = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :], mask[row, length - len(prompt) :] = prompt, 1
    return body(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).last_hidden_state


def packed(body, prompts):
    ids = torch.cat(prompts)[None]
    positions = torch.cat([torch.arange(len(p)) for p in prompts])[None]
    return body(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state


def run(args) -> dict:
    model, _ = load_llm(args.llm)
    body = model.base_model
    rng = np.random.default_rng(0)
    lengths = np.sort(rng.integers(args.min_tokens, args.max_tokens + 1, args.prompts))
    prompts = [torch.from_numpy(rng.integers(1, model.config.vocab_size, n)) for n in lengths]
    batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    times = {"padded": [], "packed": []}
    with torch.inference_mode():
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, forward in (("padded", padded), ("packed", packed)):
                start = time.perf_counter()
                for batch in batches:
                    forward(body, batch)
                times[name].append(time.perf_counter() - start)
        check = batches[0]
        difference = max(
            float((padded(body, check)[row, -1] - packed(body, check)[0, end - 1]).abs().max())
            for row, end in enumerate(np.cumsum([len(p) for p in check]))
        )
    medians = {name: statistics.median(values[1:]) for name, values in times.items()}
    result = {
        "environment": describe(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "llm": args.llm,
        "dtype": "float32",
        "prompts": args.prompts,
        "batch_size": args.batch_size,
        "tokens": int(lengths.sum()),
        "padded_tokens": int(sum(len(b) * len(b[-1]) for b in batches)),
        "seconds": times,
        "median_s": medians,
        "packed_over_padded": medians["packed"] / medians["padded"],
        "max_abs_difference_at_last_token": difference,
    }
    print(
        f"padded {medians['padded']:.2f} s, packed {medians['packed']:.2f} s "
        f"(packed takes {result['packed_over_padded']:.2f}x the time); {result['tokens']} tokens, "
        f"{result['padded_tokens']} padded; max |difference| {difference:.1e}",
        flush=True,
    )
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", default=SMOLLM2)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--min-tokens", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
