"""`python -m reclora.crm`: train a CRM (DIN, SIM, GRU4Rec, SASRec) on a dataset's full training split and report test metrics.

python -m reclora.crm --dataset ml-100k --data-dir ../shared/data/ml-100k --model sim --json out.json
"""

import argparse
import json

import torch

from reclora.crm import KINDS, build_crm, history_slots
from reclora.crm.features import CrmInputs
from reclora.crm.train import CrmTrainConfig, train_crm
from reclora.data import load_dataset, print_statistics


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="synthetic", help="synthetic, ml-100k, ml-1m, ml-25m, ml-latest or csv")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model", choices=KINDS, default="din")
    parser.add_argument(
        "--k-long", type=int, default=60, help="history items the CRM sees (SIM: retrieved; the others: the last)"
    )
    parser.add_argument("--search", choices=("soft", "hard"), default="soft", help="SIM's search")
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--no-user-id", action="store_true", help="leave the user id out of the fields")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    dataset = load_dataset(args.dataset, args.data_dir)
    print_statistics(dataset)
    inputs = CrmInputs(dataset, history_slots=history_slots(args.model, args.k_long), use_user_id=not args.no_user_id)
    model = build_crm(args.model, inputs, args.embed_dim, args.hidden, args.k_long, args.search, args.dropout)
    config = CrmTrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device
    )
    result = train_crm(model, inputs, config)
    result.update(dataset=args.dataset, model=args.model, config=vars(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
