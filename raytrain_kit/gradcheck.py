"""Numerical gradient check of a whole model, in float64, in about a second: pure, no Ray.

`check_gradients` compares the autograd directional derivative g.d with a central difference
along a few random directions d in parameter space, each tensor's part of d scaled by its probe
scale (its RMS, never less than the typical tensor's: zero-initialised biases are probed like the
rest). It works on a float64 deep copy, so the caller's model, buffers and RNG are untouched; any
batch structure a module takes (named tuples such as PackedSequence, dicts, dataclasses) is kept.
Probes that cross a kink (ReLU, max-pool) are recognised by disagreeing one-sided slopes and
retried; only consistent failures fail. A failure is then localised along the worst failed
probe's own direction: the loss alone, then each parameter tensor's share of it (bisecting groups
when there are many), so that what was caught is pinned, with a hint such as "sign error" or
"missing factor". Exercised by `raytrain-kit check jobs/digits.yaml`, `tests/test_gradcheck.py`
(including a walk over torch's parameterised layer types) and `benchmarks/gradcheck_bench.py`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, MutableMapping, Optional, Sequence

import torch
from torch import nn

EPS = torch.finfo(torch.float64).eps
# Round-off in a float64 loss is a few hundred ulps of its magnitude at most; divided by the
# step it bounds how well a finite difference can resolve a derivative.
ROUNDOFF_ULPS = 64.0
# Beyond this many tensors, localisation bisects groups instead of probing each one.
MAX_TENSORS_PROBED_ONE_BY_ONE = 24

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Probe:
    """One directional-derivative comparison."""

    target: str  # "model", "loss", or a parameter / group name
    analytic: float
    numeric: float
    rel_error: float
    status: str  # pass | fail | inconclusive | untestable
    note: str = ""
    tolerance: float = 0.0  # the largest |analytic - numeric| that passes


@dataclass
class Finding:
    """A parameter tensor (or the loss) whose gradient is wrong, with a guess at why."""

    name: str
    module: str
    module_type: str
    analytic: Optional[float]
    numeric: Optional[float]
    rel_error: Optional[float]
    hint: str


@dataclass
class GradCheckReport:
    status: str  # pass | warning | fail
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    mode: str = "train"
    num_parameters: int = 0
    num_tensors: int = 0
    num_passes: int = 0  # float64 forward or forward+backward evaluations of the model
    seconds: float = 0.0

    def failed(self, fail_on: str = "error") -> bool:
        return self.status == "fail" or (fail_on == "warning" and self.status == "warning")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "GradCheckReport":
        return cls(**{**raw, "probes": [Probe(**p) for p in raw["probes"]],
                      "findings": [Finding(**f) for f in raw["findings"]]})

    def format_table(self) -> str:
        lines = [f"gradient check: {self.status.upper()}  ({self.num_parameters:,} parameters in "
                 f"{self.num_tensors} tensors, {self.mode} mode, {self.num_passes} float64 passes, "
                 f"{self.seconds:.2f} s)"]
        lines += [f"  error:   {e}" for e in self.errors]
        lines += [f"  warning: {w}" for w in self.warnings]
        if self.probes:
            lines.append(f"  {'probe':<34} {'analytic':>13} {'numeric':>13} {'rel err':>9}  status")
            for p in self.probes:
                lines.append(f"  {p.target[:34]:<34} {p.analytic:>13.6g} {p.numeric:>13.6g} {p.rel_error:>9.2e}  "
                             f"{p.status}{'  (' + p.note + ')' if p.note else ''}")
        if self.findings:
            width = max(14, *(len(f.module_type) for f in self.findings))  # whole class names
            lines.append(f"  {'faulty':<34} {'type':<{width}} {'analytic':>13} {'numeric':>13}  hint")
            for f in self.findings:
                a = "-" if f.analytic is None else f"{f.analytic:.6g}"
                n = "-" if f.numeric is None else f"{f.numeric:.6g}"
                lines.append(f"  {f.name[:34]:<34} {f.module_type:<{width}} {a:>13} {n:>13}  {f.hint}")
        return "\n".join(lines)


def hint_for(analytic: float, numeric: float, floor: float, *, batch_size: int = 0) -> str:
    if max(abs(analytic), abs(numeric)) <= floor:
        return "untestable here (both below the round-off floor)"
    if abs(analytic) <= floor:
        return "gradient dropped (autograd gives 0, the loss does change)"
    ratio = numeric / analytic
    if abs(ratio + 1) < 0.05:
        return "sign error (analytic = -numeric)"
    if batch_size > 1 and abs(ratio * batch_size - 1) < 0.02:
        return f"missing factor 1/{batch_size}: the backward ignores the mean over the batch of {batch_size}"
    for k in range(2, 65):
        if abs(ratio - k) < 0.02 * k:
            return f"missing factor {k} (numeric = {ratio:.3g} x analytic)"
        if abs(ratio - 1 / k) < 0.02 / k:
            return f"missing factor 1/{k} (numeric = {ratio:.3g} x analytic)"
    return f"wrong gradient (numeric = {ratio:.3g} x analytic)"


class _Objective:
    """The loss as a function of the parameters, re-seeded before every evaluation."""

    def __init__(self, model: nn.Module, x, y, loss_fn: LossFn, seed: int):
        self.model, self.x, self.y, self.loss_fn, self.seed = model, x, y, loss_fn, seed
        self.num_passes = 0

    def _forward(self) -> torch.Tensor:
        torch.manual_seed(self.seed)  # inside fork_rng (see check_gradients): same dropout masks
        return self.model(self.x)

    def loss(self) -> float:
        with torch.no_grad():
            self.num_passes += 1
            return float(self.loss_fn(self._forward(), self.y))

    def loss_and_grads(self) -> torch.Tensor:
        self.model.zero_grad(set_to_none=True)
        self.num_passes += 1
        loss = self.loss_fn(self._forward(), self.y)
        # A non-scalar or non-finite loss is reported by the caller; there is nothing to differentiate.
        if loss.requires_grad and loss.dim() == 0 and bool(torch.isfinite(loss)):
            loss.backward()
        return loss.detach()


@dataclass
class _Tensor:
    name: str
    param: nn.Parameter
    original: torch.Tensor
    grad: Optional[torch.Tensor]
    scale: float


def _tolerance(a: float, b: float, *, rtol: float, floor: float) -> float:
    return rtol * max(abs(a), abs(b)) + floor


class _Prober:
    def __init__(self, objective: _Objective, tensors: list[_Tensor], *, loss0: float, step: float, rtol: float,
                 seed: int):
        self.obj, self.tensors, self.loss0, self.step, self.rtol = objective, tensors, loss0, step, rtol
        self.generator = torch.Generator().manual_seed(seed + 7)

    def directions(self, group: Sequence[_Tensor]) -> list[torch.Tensor]:
        # Scaled per tensor so that every parameter moves by about `step` of its probe scale.
        return [_gaussian(t.param.shape, self.generator).mul_(t.scale) for t in group]

    def replay(self, state: torch.Tensor, drawn_for: Sequence[_Tensor], group: Sequence[_Tensor]) -> list[torch.Tensor]:
        """The directions a probe of `drawn_for` took from generator state `state`, restricted to
        `group`: localising along a failed joint probe's own direction splits its error exactly."""
        saved = self.generator.get_state()
        self.generator.set_state(state)
        by_name = dict(zip((t.name for t in drawn_for), self.directions(drawn_for)))
        self.generator.set_state(saved)
        return [by_name[t.name] for t in group]

    def loss_at(self, group: Sequence[_Tensor], dirs: Sequence[torch.Tensor], h: float) -> float:
        with torch.no_grad():
            for t, d in zip(group, dirs):
                t.param.add_(d, alpha=h)
            try:
                return self.obj.loss()
            finally:
                for t in group:
                    t.param.copy_(t.original)

    def floor(self, *values: float, h: float) -> float:
        return ROUNDOFF_ULPS * EPS * max(abs(v) for v in (self.loss0, *values)) / h

    def probe(self, group: Sequence[_Tensor], target: str, *, analytic_fn=None, dirs=None,
              tolerance_cap: float = math.inf) -> Probe:
        """One comparison along `dirs` (fresh random ones by default). `tolerance_cap` bounds the
        tolerance, so that a part of a failed probe is judged at least as strictly as the whole."""
        dirs = self.directions(group) if dirs is None else dirs
        if analytic_fn is None:
            analytic = float(sum(torch.dot(t.grad.reshape(-1), d.reshape(-1))
                                 for t, d in zip(group, dirs) if t.grad is not None))
        else:
            analytic = analytic_fn(dirs)
        h = self.step
        plus, minus = self.loss_at(group, dirs, h), self.loss_at(group, dirs, -h)
        numeric = (plus - minus) / (2 * h)
        floor = self.floor(plus, minus, h=h)
        rel = abs(analytic - numeric) / max(abs(analytic), abs(numeric), 1e-300)
        tolerance = min(_tolerance(analytic, numeric, rtol=self.rtol, floor=floor), max(tolerance_cap, floor))
        if max(abs(analytic), abs(numeric)) <= floor:
            return Probe(target, analytic, numeric, rel, "untestable", "below the round-off floor", tolerance)
        if abs(analytic - numeric) <= tolerance:
            return Probe(target, analytic, numeric, rel, "pass", tolerance=tolerance)
        if self.crosses_kink(group, dirs, plus=plus, minus=minus, numeric=numeric, floor=floor):
            return Probe(target, analytic, numeric, rel, "inconclusive", "crossed a kink; retried", tolerance)
        return Probe(target, analytic, numeric, rel, "fail", tolerance=tolerance)

    def crosses_kink(self, group, dirs, *, plus: float, minus: float, numeric: float, floor: float) -> bool:
        """Whether a ReLU or max-pool kink lies within the step, from two more evaluations at
        half the step; a wrong gradient changes neither test. On a smooth loss the central
        differences at h and h/2 agree (both err by O(h^2)), and the one-sided slopes part by the
        curvature, linearly in the step: right - left = h k, twice its value at h/2 (up to
        O(h^3)). A kink at t*h shifts the central difference by (s1 - s2) t / 2 and makes the
        one-sided gap the jump in slope whatever the step, so one of the two breaks unless it
        does not matter. (Comparing the one-sided slopes directly, as before, flags every
        curved loss once the step is large enough to resolve small errors.)"""
        h, loss0 = self.step, self.loss0
        plus_half, minus_half = self.loss_at(group, dirs, h / 2), self.loss_at(group, dirs, -h / 2)
        half = (plus_half - minus_half) / h
        gap = (plus - loss0) / h - (loss0 - minus) / h
        gap_half = (plus_half - loss0) / (h / 2) - (loss0 - minus_half) / (h / 2)
        # Round-off in units of `floor` (that of a central difference at h): 4 in `gap`, 16 in
        # twice `gap_half`; 2 in `half`.
        return (abs(half - numeric) > _tolerance(half, numeric, rtol=self.rtol, floor=2 * floor)
                or abs(gap - 2 * gap_half) > _tolerance(gap, 2 * gap_half, rtol=self.rtol, floor=24 * floor))

    def settled(self, group: Sequence[_Tensor], target: str, *, tries: int = 3, analytic_fn=None, dirs=None,
                tolerance_cap: float = math.inf) -> Probe:
        """Probe until a conclusive answer (kinks are retried along new directions)."""
        result = self.probe(group, target, analytic_fn=analytic_fn, dirs=dirs, tolerance_cap=tolerance_cap)
        for _ in range(tries - 1):
            if result.status != "inconclusive":
                break
            result = self.probe(group, target, analytic_fn=analytic_fn, tolerance_cap=tolerance_cap)
        return result


def _module_of(model: nn.Module, name: str) -> tuple[str, str]:
    path = name.rsplit(".", 1)[0] if "." in name else ""
    try:
        return path or "(root)", type(model.get_submodule(path)).__name__
    except AttributeError:
        return path or "(root)", "?"


def _cast_batch(value):
    """Floating tensors to float64 on the CPU; every container a module accepts keeps its type and
    structure (tuples, named tuples such as PackedSequence, whose int64 `batch_sizes` stay as
    they are, lists, dicts, dataclasses); anything else is passed through."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64) if value.is_floating_point() else value.detach().cpu()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # named tuple: fields are positional
        return type(value)(*(_cast_batch(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_batch(v) for v in value)
    if isinstance(value, MutableMapping):  # a copy keeps the type's own state (a defaultdict's factory)
        cast = copy.copy(value)
        for k, v in value.items():
            cast[k] = _cast_batch(v)
        return cast
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cast = copy.copy(value)
        for f in dataclasses.fields(value):
            object.__setattr__(cast, f.name, _cast_batch(getattr(value, f.name)))  # frozen ones too
        return cast
    return value


def _check_loss(loss_fn: LossFn, outputs: torch.Tensor, y, *, step: float, rtol: float,
                seed: int) -> tuple[Probe, float]:
    """Is the loss's own backward right? Checked against its outputs alone: no model passes."""
    outputs = outputs.detach().requires_grad_(True)
    loss = loss_fn(outputs, y)
    (grad,) = torch.autograd.grad(loss, outputs, allow_unused=True)
    grad = torch.zeros_like(outputs) if grad is None else grad
    scale = float(outputs.detach().pow(2).mean().sqrt()) or 1.0
    d = _gaussian(outputs.shape, torch.Generator().manual_seed(seed + 11)).mul_(scale)
    with torch.no_grad():
        plus = float(loss_fn(outputs + step * d, y))
        minus = float(loss_fn(outputs - step * d, y))
    analytic, numeric = float((grad * d).sum()), (plus - minus) / (2 * step)
    floor = ROUNDOFF_ULPS * EPS * max(abs(float(loss.detach())), abs(plus), abs(minus)) / step
    rel = abs(analytic - numeric) / max(abs(analytic), abs(numeric), 1e-300)
    ok = abs(analytic - numeric) <= _tolerance(analytic, numeric, rtol=rtol, floor=floor)
    return Probe("loss", analytic, numeric, rel, "pass" if ok else "fail"), floor


def check_gradients(model: nn.Module, batch: tuple, loss_fn: LossFn, *, num_directions: int = 4,
                    rtol: float = 1e-5, step: float = 1e-6, jitter: float = 1e-3, seed: int = 0) -> GradCheckReport:
    """Check `loss_fn(model(x), y)`'s gradients w.r.t. every trainable parameter of `model`.

    The copy's parameters are first moved by `jitter` of their probe scale: zero biases on zero
    inputs (blank pixels) put ReLUs exactly on their kink, where no finite difference is
    conclusive; a backward bug is as visible a hair away from that point. `step` is the central
    difference's step along a direction of per-element size one probe scale: 1e-6 resolves
    derivatives three orders of magnitude finer than 1e-9 did (round-off ~ eps / step) while the
    truncation error (~ step^2) stays far below `rtol`; the kinks it crosses more often are
    recognised and retried.
    """
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        report = _check(model, batch, loss_fn, num_directions=num_directions, rtol=rtol, step=step,
                        jitter=jitter, seed=seed)
    report.seconds = time.perf_counter() - started
    return report


def _gaussian(shape, generator: torch.Generator) -> torch.Tensor:
    # float32 normals cast up: a third of the cost of float64 ones, and a direction (or a jitter)
    # needs no more precision than that; the maths after it is all float64.
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(torch.float64)


def _rms(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.detach()) / math.sqrt(t.numel())) if t.numel() else 0.0


def probe_scales(params: Sequence[torch.Tensor]) -> list[float]:
    """Each tensor's probe scale: its RMS, but never less than the typical tensor's (the RMS of
    the tensors' RMS). Biases and normalization shifts start at zero: scaled by their own size they
    would be probed 1e3 times more finely than the rest (after jitter), their derivatives sunk
    under the round-off floor and their bugs missed. How close to zero a tensor happens to start
    says nothing about how far it may move."""
    sizes = [_rms(p) for p in params]
    typical = math.sqrt(sum(s * s for s in sizes) / len(sizes)) if sizes else 0.0
    return [max(s, typical or 1e-2) for s in sizes]


def _jitter(params: Sequence[torch.Tensor], scales: Sequence[float], *, amount: float, seed: int) -> None:
    if amount <= 0:
        return
    generator = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for p, scale in zip(params, scales):
            p.add_(_gaussian(p.shape, generator), alpha=amount * scale)


def _check(model, batch, loss_fn, *, num_directions, rtol, step, jitter, seed) -> GradCheckReport:
    model64 = copy.deepcopy(model).to(device="cpu", dtype=torch.float64)
    named = [(n, p) for n, p in model64.named_parameters() if p.requires_grad]
    scales = probe_scales([p for _, p in named])  # taken before the jitter, which moves by them
    _jitter([p for _, p in named], scales, amount=jitter, seed=seed)
    x, y = _cast_batch(batch[0]), _cast_batch(batch[1])
    obj = _Objective(model64, x, y, loss_fn, seed)
    report = GradCheckReport(status="pass", mode="train" if model.training else "eval")

    loss = obj.loss_and_grads()
    if loss.dim() != 0:
        report.errors.append(f"loss: expected a scalar, got shape {list(loss.shape)}")
    elif not math.isfinite(float(loss)):
        report.errors.append(f"loss: not finite ({float(loss)})")
    if report.errors:
        return _finish(report, obj)
    # Stochastic layers must repeat exactly under a fixed seed, or differences mean nothing.
    if obj.loss() != obj.loss():
        model64.eval()
        report.mode = "eval"
        report.warnings.append("the loss is not reproducible under a fixed seed in train mode; checked in eval mode")
        loss = obj.loss_and_grads()
    loss0 = float(loss)

    # The gradients are not recomputed after this point, so they are used in place.
    tensors = [_Tensor(name, p, p.detach().clone(), None if p.grad is None else p.grad.detach(), scale)
               for (name, p), scale in zip(named, scales)]
    report.num_parameters = sum(t.param.numel() for t in tensors)
    report.num_tensors = len(tensors)
    prober = _Prober(obj, tensors, loss0=loss0, step=step, rtol=rtol, seed=seed)

    for t in tensors:
        module, kind = _module_of(model64, t.name)
        if t.grad is None:
            continue
        norm = float(torch.linalg.vector_norm(t.grad))
        if not math.isfinite(norm):
            report.errors.append(f"{t.name} ({kind}): gradient has NaN or inf")
        elif norm == 0:
            report.warnings.append(f"{t.name} ({kind}): gradient is all zeros")
    if report.errors:
        return _finish(report, obj)

    _check_without_gradient(report, prober, model64, [t for t in tensors if t.grad is None])
    with_grad = [t for t in tensors if t.grad is not None]
    worst = _probe_model(report, prober, with_grad, num_directions=num_directions) if with_grad else None
    if worst is not None:
        _localise(report, prober, model64, obj, with_grad, loss_fn, rtol=rtol, step=step, seed=seed, failed=worst)
    return _finish(report, obj)


def _check_without_gradient(report, prober: "_Prober", model64, tensors: list[_Tensor]) -> None:
    """A parameter without a gradient is either unused (numeric slope 0) or dropped by a backward."""
    for t in tensors:
        module, kind = _module_of(model64, t.name)
        result = prober.settled([t], t.name, analytic_fn=lambda dirs: 0.0)
        if result.status in ("fail", "inconclusive"):
            report.errors.append(f"{t.name} ({kind}): no gradient, but the loss depends on it "
                                 "(a backward returned None)")
            report.findings.append(Finding(t.name, module, kind, None, result.numeric, None,
                                           "gradient dropped (backward returned None)"))
        else:
            report.warnings.append(f"{t.name} ({kind}): unused parameter (no gradient; breaks DDP "
                                   "unless every parameter takes part in the loss)")


def _probe_model(report, prober: "_Prober", tensors: list[_Tensor], *, num_directions: int
                 ) -> Optional[tuple[torch.Tensor, float]]:
    """Probe every tensor at once along `num_directions` conclusive random directions (inconclusive
    ones are retried, up to twice as many in all). Returns the worst failed probe's generator
    state and tolerance (what localisation replays), or None if none failed."""
    budget = 2 * num_directions
    worst = None  # (excess over tolerance, generator state, tolerance)
    while budget and sum(p.status in ("pass", "fail", "untestable") for p in report.probes
                         if p.target == "model") < num_directions:
        budget -= 1
        state = prober.generator.get_state()
        result = prober.probe(tensors, "model")
        report.probes.append(result)
        excess = abs(result.analytic - result.numeric) / result.tolerance
        if result.status == "fail" and (worst is None or excess > worst[0]):
            worst = (excess, state, result.tolerance)
    failures = sum(p.status == "fail" for p in report.probes)
    conclusive = sum(p.status in ("pass", "fail") for p in report.probes)
    kinks = sum(p.status == "inconclusive" for p in report.probes)
    if not conclusive:
        report.warnings.append("no probe was conclusive: every direction tried crossed a kink or fell "
                               "below the round-off floor; the gradients are unchecked")
    if not failures:
        return None
    report.errors.append(f"gradients disagree with finite differences in {failures} of {conclusive} random "
                         f"directions" + (f" ({kinks} more crossed a kink)" if kinks else ""))
    return worst[1:]


def _localise(report, prober: _Prober, model64, obj: _Objective, tensors: list[_Tensor], loss_fn, *, rtol, step, seed,
              failed: tuple[torch.Tensor, float]):
    """Blame the loss or the tensors. Each part is probed along the worst failed probe's own
    direction, restricted to it, with at most that probe's tolerance: the parts' errors add up to
    the error that was detected, so a bug that was caught is also pinned (as sensitive as detection)."""
    state, tolerance = failed
    with torch.no_grad():
        torch.manual_seed(obj.seed)
        outputs = model64(obj.x)
    obj.num_passes += 1
    loss_probe, floor = _check_loss(loss_fn, outputs, obj.y, step=max(step, 1e-7), rtol=rtol, seed=seed)
    report.probes.append(loss_probe)
    if loss_probe.status == "fail":
        batch_size = len(obj.y) if hasattr(obj.y, "__len__") else 0
        report.findings.append(Finding("loss", "loss", getattr(loss_fn, "__name__", type(loss_fn).__name__),
                                       loss_probe.analytic, loss_probe.numeric, loss_probe.rel_error,
                                       hint_for(loss_probe.analytic, loss_probe.numeric, floor, batch_size=batch_size)))
        return

    def probe_group(group: list[_Tensor]) -> Probe:
        name = group[0].name if len(group) == 1 else f"{group[0].name} .. {group[-1].name} ({len(group)})"
        result = prober.settled(group, name, dirs=prober.replay(state, tensors, group), tolerance_cap=tolerance)
        report.probes.append(result)
        if result.status == "untestable" and len(group) == 1:
            report.warnings.append(f"{name}: untestable here (its derivative is below the round-off floor)")
        return result

    def record(t: _Tensor, result: Probe):
        module, kind = _module_of(model64, t.name)
        floor = prober.floor(h=prober.step)
        report.findings.append(Finding(t.name, module, kind, result.analytic, result.numeric, result.rel_error,
                                       hint_for(result.analytic, result.numeric, floor)))

    def search(group: list[_Tensor]):
        if len(group) == 1:
            result = probe_group(group)
            if result.status == "fail":
                record(group[0], result)
            return
        middle = len(group) // 2
        for half in (group[:middle], group[middle:]):
            if probe_group(half).status == "fail":
                search(half)

    if len(tensors) <= MAX_TENSORS_PROBED_ONE_BY_ONE:
        for t in tensors:
            result = probe_group([t])
            if result.status == "fail":
                record(t, result)
    else:
        search(tensors)
    if not report.findings:
        report.warnings.append("the failure could not be pinned on one tensor: several small errors add up")


def _finish(report: GradCheckReport, obj: _Objective) -> GradCheckReport:
    report.num_passes = obj.num_passes
    report.status = "fail" if report.errors else ("warning" if report.warnings else "pass")
    return report
