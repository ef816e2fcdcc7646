"""Gradient-check benchmark: the kit's checker against torch.autograd.gradcheck, in one run.

Prints, per model (MLPs of ~55k and ~5M parameters, a ~5M-parameter transformer encoder): the
time of one float64 forward+backward, the kit's check time and its ratio to that pass, and
torch.autograd.gradcheck's fast mode (and slow mode on the 55k model); then which injected bugs
each checker catches. Writes benchmarks/results/gradcheck.json.

    python benchmarks/gradcheck_bench.py [--quick]   # --quick skips the 36 s slow-mode run
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gradcheck_models import (CustomLinear, buggy_mlp, cross_entropy, mse_ignoring_reduction,  # noqa: E402
                              mse_without_factor_2)
from raytrain_kit.gradcheck import check_gradients  # noqa: E402


class Encoder(nn.Module):
    def __init__(self, d_model=384, layers=3, seq=16, features=32, classes=10):
        super().__init__()
        self.embed = nn.Linear(features, d_model)
        layer = nn.TransformerEncoderLayer(d_model, 6, 4 * d_model, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def models():
    torch.manual_seed(0)
    return {
        "mlp_55k": (nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)),
                    (64,)),
        "mlp_5m": (nn.Sequential(nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                                 nn.Linear(2048, 512), nn.ReLU(), nn.Linear(512, 10)), (64,)),
        "transformer_5m": (Encoder(), (16, 32)),
    }


def batch_for(shape, classes=10, n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def best_of(fn, repeats=3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def torch_gradcheck(model, batch, loss_fn, *, fast: bool) -> bool:
    """torch.autograd.gradcheck over the flattened parameters of a float64 copy (train mode,
    dropout off: it cannot re-seed between evaluations)."""
    import copy

    m = copy.deepcopy(model).double()
    for module in m.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for _, p in m.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in m.parameters()]).requires_grad_(True)
    x, y = batch[0].double(), batch[1]

    def f(theta):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            size = shape.numel()
            params[name] = theta[offset:offset + size].view(shape)
            offset += size
        return loss_fn(functional_call(m, params, (x,)), y)

    return torch.autograd.gradcheck(f, (flat,), fast_mode=fast, raise_exception=False, eps=1e-6, atol=1e-5, rtol=1e-3)


def torch_child(name: str, mode: str, *, limit: float) -> tuple:
    """(passed, seconds) of torch.autograd.gradcheck in a child process; seconds is inf if stopped."""
    import subprocess

    try:
        done = subprocess.run([sys.executable, __file__, "--torch-child", name, mode], capture_output=True,
                              text=True, timeout=limit, check=True)
    except subprocess.TimeoutExpired:
        return None, float("inf")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["ok"], result["seconds"]


def fwd_bwd_seconds(model, batch, loss_fn) -> float:
    import copy

    m = copy.deepcopy(model).double()
    x, y = batch[0].double(), batch[1]

    def once():
        m.zero_grad()
        loss_fn(m(x), y).backward()

    once()
    return best_of(once, 5)


def detection_cases():
    def mlp(bug, outputs=3):
        torch.manual_seed(0)
        return buggy_mlp(10, outputs, bug=bug)

    x, y = batch_for((10,), 3)
    regression = (x, torch.randn(8))
    return [
        ("weight gradient sign flipped", mlp("sign"), (x, y), cross_entropy, "2.weight"),
        ("bias gradient zeroed", mlp("zero_bias"), (x, y), cross_entropy, "2.bias"),
        ("backward returns None (bias)", mlp("none_bias"), (x, y), cross_entropy, "2.bias"),
        ("MSE backward missing factor 2", mlp("", 1), regression, mse_without_factor_2, "loss"),
        ("loss backward ignores reduction", mlp("", 1), regression, mse_ignoring_reduction, "loss"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="skip the slow-mode gradcheck")
    parser.add_argument("--limit", type=float, default=120.0,
                        help="seconds allowed for each torch.autograd.gradcheck run (it is stopped after)")
    parser.add_argument("--torch-child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_child:  # run in a child process, so that the limit can stop it
        name, mode = args.torch_child
        model, shape = models()[name]
        start = time.perf_counter()
        ok = torch_gradcheck(model.train(), batch_for(shape), cross_entropy, fast=mode == "fast")
        print(json.dumps({"ok": ok, "seconds": time.perf_counter() - start}))
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for name, (model, shape) in models().items():
        model.train()
        batch = batch_for(shape)
        params = sum(p.numel() for p in model.parameters())
        pass_s = fwd_bwd_seconds(model, batch, cross_entropy)
        report = check_gradients(model, batch, cross_entropy)
        kit_s = best_of(lambda: check_gradients(model, batch, cross_entropy), 3)
        row = {"model": name, "parameters": params, "fwd_bwd_s": pass_s, "kit_s": kit_s, "kit_status": report.status,
               "kit_passes_counted": report.num_passes, "kit_cost_in_passes": kit_s / pass_s}
        row["torch_fast_ok"], row["torch_fast_s"] = torch_child(name, "fast", limit=args.limit)
        if name == "mlp_55k" and not args.quick:
            row["torch_slow_ok"], row["torch_slow_s"] = torch_child(name, "slow", limit=args.limit)
        rows.append(row)
        print(f"measured {name}", file=sys.stderr, flush=True)

    def shown(seconds):
        return "-" if seconds is None else (f"> {args.limit:.0f} (stopped)" if seconds == float("inf") else f"{seconds:.2f}")

    print("| model | parameters | fwd+bwd (s) | kit check (s) | kit / fwd+bwd | kit status | torch fast (s) | torch slow (s) |")
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['parameters']:,} | {r['fwd_bwd_s']:.4f} | {r['kit_s']:.3f} | "
              f"{r['kit_cost_in_passes']:.1f}x | {r['kit_status']} | {shown(r['torch_fast_s'])} | "
              f"{shown(r.get('torch_slow_s'))} |")

    # A failing check pays for localisation: the 5M MLP with a zeroed bias gradient in one layer.
    torch.manual_seed(0)
    buggy = nn.Sequential(nn.Linear(64, 2048), nn.ReLU(), CustomLinear(2048, 2048, bug="zero_bias"), nn.ReLU(),
                          nn.Linear(2048, 512), nn.ReLU(), nn.Linear(512, 10))
    batch = batch_for((64,))
    report = check_gradients(buggy, batch, cross_entropy)
    failing = {"model": "mlp_5m with a zeroed bias gradient", "status": report.status,
               "named": [f.name for f in report.findings], "passes_counted": report.num_passes,
               "kit_s": best_of(lambda: check_gradients(buggy, batch, cross_entropy), 3),
               "fwd_bwd_s": fwd_bwd_seconds(buggy, batch, cross_entropy)}
    failing["kit_cost_in_passes"] = failing["kit_s"] / failing["fwd_bwd_s"]
    print(f"\nfailing check with localisation, {failing['model']}: {failing['status']}, names "
          f"{', '.join(failing['named'])}, {failing['kit_s']:.3f} s = {failing['kit_cost_in_passes']:.1f}x "
          f"one float64 forward+backward ({failing['passes_counted']} passes counted)")

    detection = []
    for label, model, batch, loss_fn, culprit in detection_cases():
        report = check_gradients(model, batch, loss_fn)
        named = [f.name for f in report.findings]
        kit_s = best_of(lambda: check_gradients(model, batch, loss_fn), 3)
        detection.append({"bug": label, "kit_caught": report.status == "fail", "kit_named": named,
                          "kit_hint": report.findings[0].hint if report.findings else "",
                          "kit_passes_counted": report.num_passes, "kit_s": kit_s,
                          "expected": culprit, "torch_fast_caught": not torch_gradcheck(model, batch, loss_fn, fast=True)})
    print()
    print("| injected bug | kit | kit names | kit hint | torch.autograd.gradcheck fast |")
    print("|---|---|---|---|---|")
    for d in detection:
        print(f"| {d['bug']} | {'caught' if d['kit_caught'] else 'MISSED'} | {', '.join(d['kit_named']) or '-'} | "
              f"{d['kit_hint']} | {'caught' if d['torch_fast_caught'] else 'MISSED'} |")

    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gradcheck.json").write_text(json.dumps({
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "models": rows, "failing_5m": failing, "detection": detection}, indent=1))


if __name__ == "__main__":
    main()
