"""What a user would write instead of `raytrain-kit tune jobs/sweep_digits.yaml`: a plain Optuna
study in one process, no Ray.

The same CNN as the kit's (benchmarks/plain.py), the same search space (lr log-uniform in
[1e-4, 3e-2], one of the five init schemes, an L2 penalty log-uniform in [1e-6, 1e-2] on the
weights), Adam, dropout 0.1, batch 64, 12 epochs of a cosine schedule with 20 warmup steps down
to 1e-4, random sampling of 27 trials, and successive-halving pruning on validation accuracy
after every epoch (min resource 1, reduction factor 3: ASHA's rungs at 1, 3 and 9). Prints one
JSON line: the best validation accuracy, the epochs trained and the study's wall time.

    python benchmarks/optuna_sweep.py            # the 27 trials of 12 epochs
    python benchmarks/optuna_sweep.py --quick    # 6 trials of 4 epochs
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import optuna
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain import build_model, digits_data, warmup_cosine  # noqa: E402

SCHEMES = ("kaiming_normal", "kaiming_uniform", "xavier_uniform", "orthogonal", "normal")


def initialize(model: nn.Module, scheme: str) -> None:
    """The kit's init schemes (initializers.py) on conv and linear weights, biases at zero."""
    init = {"kaiming_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
            "kaiming_uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
            "xavier_uniform": nn.init.xavier_uniform_, "orthogonal": nn.init.orthogonal_,
            "normal": lambda w: nn.init.normal_(w, std=0.02)}[scheme]
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                init(module.weight)
                nn.init.zeros_(module.bias)


def objective(trial: optuna.Trial, data, *, epochs: int, seed: int) -> float:
    lr = trial.suggest_float("lr", 1e-4, 3e-2, log=True)
    scheme = trial.suggest_categorical("init", SCHEMES)
    l2 = trial.suggest_float("l2", 1e-6, 1e-2, log=True)
    x_train, y_train, x_val, y_val = data
    torch.manual_seed(seed)
    model = build_model("digits", seed=seed)
    initialize(model, scheme)
    weights = [p for p in model.parameters() if p.dim() >= 2]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batch_size = 64
    steps_per_epoch = math.ceil(len(y_train) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(
        s, total=epochs * steps_per_epoch, warmup=20, min_ratio=1e-4 / lr))
    best = 0.0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for start in range(0, len(y_train), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx]) + l2 * sum(w.pow(2).sum() for w in weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            accuracy = float((model(x_val).argmax(1) == y_val).float().mean())
        best = max(best, accuracy)
        trial.set_user_attr("epochs", epoch + 1)
        trial.report(accuracy, epoch + 1)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="6 trials of 4 epochs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    num_trials, epochs = (6, 4) if args.quick else (27, 12)
    started = time.perf_counter()
    data = digits_data(args.seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=args.seed),
                                pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3))
    study.optimize(lambda t: objective(t, data, epochs=epochs, seed=args.seed), n_trials=num_trials)
    scored = [t for t in study.trials if t.intermediate_values]
    print(json.dumps({"best_val_accuracy": max(max(t.intermediate_values.values()) for t in scored),
                      "num_trials": len(study.trials),
                      "num_pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
                      "epochs_trained": sum(t.user_attrs.get("epochs", 0) for t in study.trials),
                      "study_s": round(time.perf_counter() - started, 2), "torch_threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
