"""Loss-rejection protocol (AutoLoss-Zero §3.2, appendix A).

B probe samples with the predictions of a randomly initialised network are optimised *directly*
(the predictions, not the network) with SGD (lr 1e-3, momentum 0.9, 500 steps, no weight decay) under
the candidate loss, with no normalisation along any dimension (the tree output is summed). A candidate
whose correlation score g is below η = 0.6 is rejected. The metric is a function, so the protocol works
for any task.

The acceptance rule (`ScreeningConfig.gain`) decides how g is measured:

* ``"normalized"`` (default): g = mean_b (ξ(ŷ*_b) − ξ(ŷ_b)) / (ξ_max,b − ξ(ŷ_b)), the share of the
  reachable headroom the loss closes, with ξ_max,b the metric of the perfect prediction
  (`ScreeningProblem.perfect_predictions`: the target itself, or for a boundary-target probe the labels
  on the edges that y carries, see components.tasks.segmentation.probe). It is computed, not assumed to be 1:
  a sample without boundaries has BIoU/BF1 ξ_max = 0. Samples whose headroom is ≤ `HEADROOM_EPS` are
  skipped (they cannot tell losses apart); a probe with no headroom at all is an error.
* ``"absolute"``: the paper's g = mean_b ξ(ŷ*_b) − ξ(ŷ_b). Reason for not making it the default: with
  few classes a random prediction already scores high (2 classes: mIoU ≈ 0.4), so even cross-entropy
  gets g ≈ 0.56 < 0.6 and a 2-class search accepts nothing. Measured normalised g (3 probe samples at
  32², 500 steps): CE ≈ 1.0 on 2-, 8- and 21-class probes for every metric, soft IoU and the Table-8
  losses on their own metric ≥ 0.8, degenerate losses (constants, functions of y alone, Σ −ŷ, ŷ², …)
  ≤ 0.1; so η = 0.6 keeps one meaning for any number of classes and any metric
  (tests/test_acceptance_rule.py).

The rule is part of `ScreeningConfig.digest()`, so cached verdicts of one rule are never reused under
the other.

`screen` is the fast implementation and `screen_naive` the plain reference used by
`bench/screening.py`. Both return the same verdicts; `screen` gets its speed from

* batching: the B samples are stacked as `(B, 1, C, H, W)`; operators act on the last four dims and the
  samples are independent, so the summed loss gives every sample its own gradient in one pass;
* constant folding: sub-trees that do not depend on the predictions (e.g. `mul(y, 1)`) are computed
  once instead of at each of the 500 steps (bit-for-bit the same values);
* a hand-written backward (`_Program`, for the Table-1 operators): the tree runs under no_grad and its
  gradient is computed with autograd's own formulas in autograd's order (bit-for-bit the same
  gradient), the softmax's backward is called directly, 3×3 pooling is a separable maximum with the
  CPU kernel's gradient routing (`_Pool3`; PyTorch's CPU max_pool2d is scalar code, ~10 ms a call at
  5×21×64²), and a large probe is processed one sample at a time so that a step's tensors stay in
  the cache. Other operator sets and the Eq. 3 objective use autograd;
* exact early exits that cannot change a verdict: a NaN/Inf loss or gradient ends the run at once
  (the verdict is "nan_*" whatever happens later); a gradient that is exactly zero at the initial
  predictions means SGD never moves them (g = 0, "zero_gradient"); a zero gradient later on whose
  update no longer changes the predictions means they are frozen for good, so the remaining steps
  are skipped and g is computed from the frozen predictions;
* exact reuse of unchanged steps: when an update leaves the predictions bit-for-bit unchanged (an
  update below half an ulp, e.g. a loss whose gradient is only rounding noise such as inv(mean_c(ŷ))),
  the next loss and gradient are the same again, so only the momentum is advanced; once the momentum
  reaches its fixed point as well, nothing can change any more and the remaining steps are skipped;
* ξ of the initial and of the perfect predictions (the same for every candidate) computed once per probe;
* the gradient-equivalence cache (`components.search.equivalence`): the gradient norms at the initial
  predictions are the first SGD step's gradient anyway, so the fingerprint is free and a candidate
  whose fingerprint was already screened (under the same problem and config) reuses that outcome;
* an optional early check (`ScreeningConfig.early_check_step`, off by default): at that step g is
  measured on the current predictions and the candidate is rejected ("early_reject") if
  g ≤ `early_check_min_gain` (default 0: the metric has not improved at all yet). This CAN change a
  verdict, in one direction only: a loss whose g is still ≤ the minimum gain at that step but would
  have reached η by the last step is rejected (a false rejection); no rejected loss is ever accepted
  by it. With the default (None) the verdicts are the paper's. `bench/screening.py` measures how
  often it disagrees with the full protocol.
* `parallel_screening.screen_many(..., workers=n)`: a process pool over candidates (fork), one torch thread each.

The gradient-scale check (`ScreeningConfig.max_gradient_ratio`, a Lossforge addition, off by default; on in
the detection and instance-segmentation profiles): a candidate whose gradient norm at the initial predictions
is more than R times above or below that of the probe's reference loss (`ScreeningProblem.reference`, e.g.
CE, or the CE + GIoU baseline's tree of a detection branch) is rejected ("gradient_scale") before the SGD
steps. The protocol optimises each branch alone, where the step size only rescales time; in training the
branches share one optimiser (and its gradient clipping), whose schedule was set for the reference losses, so
a branch whose gradient is 20x the reference's swamps the others. Measured (CPU detection proxy, 3 seeds):
the detection demo's best candidate passed all four branch probes with R-CNN ratios 10x and 22x and trained
to proxy mAP 0.000-0.003 (CE + smooth L1: 0.28-0.30); the Table-8 loss, ratios 0.5-2.3, reached 0.10-0.19.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import weakref
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Callable, Literal, Mapping, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from components.errors import LossforgeError

if TYPE_CHECKING:  # pragma: no cover
    from components.search.graph import LossGraph


class ScreeningCache(Protocol):
    """Where verdicts are remembered by gradient fingerprint (`components.search.equivalence.EquivalenceCache`);
    a protocol so that the screening does not import the cache (the cache uses this module's helpers)."""

    def get_screening(self, fp: tuple | None, config_digest: str | None = None) -> "ScreeningResult | None": ...

    def put_screening(self, fp: tuple, result: "ScreeningResult", config_digest: str, graph=None) -> None: ...

InputsFn = Callable[[Tensor, Tensor], Mapping[str, Mapping[str, Tensor]]]
MetricFn = Callable[[Tensor, Tensor], Tensor]

# Reasons a ScreeningResult can carry ("error: <msg>" besides these).
ACCEPTED = "accepted"
BELOW_THRESHOLD = "below_threshold"
NAN_LOSS = "nan_loss"
NAN_GRADIENT = "nan_gradient"
ZERO_GRADIENT = "zero_gradient"
EARLY_REJECT = "early_reject"
GRADIENT_SCALE = "gradient_scale"
REASONS = (ACCEPTED, BELOW_THRESHOLD, NAN_LOSS, NAN_GRADIENT, ZERO_GRADIENT, EARLY_REJECT, GRADIENT_SCALE, "error")


@dataclass(frozen=True, eq=False)
class ScreeningProblem:
    """The probe a candidate is screened on.

    init_predictions: `(B, 1, C, H, W)` raw predictions (logits) of a randomly initialised network;
    targets: `(B, 1, H, W)` (or any task-specific layout understood by `build_inputs` and `metric`);
    build_inputs(pred, targets) -> {branch: {input name: tensor}} (e.g. softmax → `y_hat`, one-hot → `y`);
    valid: a mask broadcastable to the tree outputs (ignore label) or None;
    metric(pred, targets) -> `(B,)` per-sample metric ξ (higher is better);
    key: identifies task + metric + probe data, so caches never mix problems;
    perfect_predictions: predictions in the layout of `init_predictions` that reproduce the targets
    (ξ of them is ξ_max of the normalised gain); None allows only `gain="absolute"`;
    branch_problems: for tasks with several loss branches, branch -> the probe of that branch alone.
    """

    init_predictions: Tensor
    targets: Tensor
    build_inputs: InputsFn
    metric: MetricFn
    key: str
    valid: Tensor | None = None
    task: str = "segmentation"
    metric_name: str = ""
    perfect_predictions: Tensor | None = None
    # multi-branch tasks (paper A.2): one probe per branch with the other branches' predictions at their targets;
    # the search then screens each branch's tree on its own probe (components.search.engine)
    branch_problems: Mapping[str, "ScreeningProblem"] | None = None
    # the task's reference loss on this probe (e.g. CE, or CE + GIoU per detection branch): the yardstick of
    # the gradient-scale check (`ScreeningConfig.max_gradient_ratio`); None disables the check on this probe
    reference: "LossGraph | None" = None

    @property
    def samples(self) -> int:
        """Number of probe samples B."""
        return int(self.init_predictions.shape[0])


GAIN_RULES = ("normalized", "absolute")
HEADROOM_EPS = 1e-6  # a sample whose ξ_max − ξ(initial) is at most this is skipped by the normalised gain


@dataclass(frozen=True)
class ScreeningConfig:
    """Loss-rejection settings (paper defaults: B = 5, 500 SGD steps, lr 1e-3, momentum 0.9, η = 0.6).

    `gain` is the acceptance rule ("normalized" by default, "absolute" = the paper's; see the module
    docstring); `normalize` is unrelated: it normalises the loss objective (Eq. 3), not the gain.
    """

    samples: int = 5
    steps: int = 500
    lr: float = 1e-3
    momentum: float = 0.9
    threshold: float = 0.6
    normalize: bool = False  # the paper does not normalise in the protocol (plain sum of the output)
    stop_when_frozen: bool = True  # exact: skip steps once a zero gradient leaves predictions unchanged
    early_check_step: int | None = None  # optional, can falsely reject (see module docstring)
    early_check_min_gain: float = 0.0  # early_reject if g <= this at early_check_step
    gain: Literal["normalized", "absolute"] = "normalized"  # acceptance rule (module docstring)
    # gradient-scale check (module docstring), off by default: reject a candidate whose gradient norm at the
    # initial predictions is more than this factor above or below the probe's reference loss's
    max_gradient_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.gain not in GAIN_RULES:
            raise LossforgeError(f"screening: gain must be one of {', '.join(GAIN_RULES)}, got {self.gain!r}")
        if self.samples < 1:
            raise LossforgeError(f"screening: samples must be >= 1, got {self.samples}")
        if self.steps < 0:
            raise LossforgeError(f"screening: steps must be >= 0, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise LossforgeError(f"screening: lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise LossforgeError(f"screening: momentum must be in [0, 1), got {self.momentum}")
        if self.max_gradient_ratio is not None and not (
                isinstance(self.max_gradient_ratio, (int, float)) and not isinstance(self.max_gradient_ratio, bool)
                and 1 < self.max_gradient_ratio < math.inf):
            raise LossforgeError(f"screening: max_gradient_ratio must be a number > 1 (or null = off), "
                                 f"got {self.max_gradient_ratio!r}")
        if self.early_check_step is not None and not 0 < self.early_check_step <= self.steps:
            raise LossforgeError(
                f"screening: early_check_step must be in (0, steps={self.steps}], got {self.early_check_step}"
            )

    def digest(self) -> str:
        """Short hash of the settings that decide a verdict (cached outcomes are tied to it).

        The gain rule is in it; "absolute" is left out of the payload so that digests (and caches)
        written before the rule existed, which were all absolute, stay valid.
        """
        payload = {k: v for k, v in asdict(self).items() if k != "stop_when_frozen"}
        if payload["max_gradient_ratio"] is None:  # off: digests (and caches) from before the check stay valid
            del payload["max_gradient_ratio"]
        if payload["gain"] == "absolute":
            del payload["gain"]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ScreeningResult:
    """Outcome of screening one candidate.

    score is g (None when it could not be computed); reason is one of REASONS or "error: <msg>";
    fingerprint is the rounded per-sample gradient norms and signed projections at the initial predictions
    (`fingerprint_from_grad`; None if non-finite);
    steps_run counts the SGD steps actually taken; cached is True when the outcome was reused from the
    gradient-equivalence cache.
    """

    accepted: bool
    score: float | None
    reason: str
    fingerprint: tuple[float, ...] | None
    seconds: float
    steps_run: int = 0
    cached: bool = False

    def to_dict(self) -> dict:
        """JSON-able form (used by the equivalence cache and state files)."""
        d = asdict(self)
        d["fingerprint"] = list(self.fingerprint) if self.fingerprint is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "ScreeningResult":
        """Inverse of to_dict."""
        fp = d.get("fingerprint")
        return cls(
            accepted=bool(d["accepted"]),
            score=None if d.get("score") is None else float(d["score"]),
            reason=str(d["reason"]),
            fingerprint=None if fp is None else tuple(float(v) for v in fp),
            seconds=float(d.get("seconds", 0.0)),
            steps_run=int(d.get("steps_run", 0)),
            cached=bool(d.get("cached", False)),
        )


# --------------------------------------------------------------------------------------------------
# The objective: the candidate's loss on the probe, with constant sub-trees folded.


def _first_tensor(inputs: Mapping[str, Tensor]) -> Tensor:
    for value in inputs.values():
        if isinstance(value, Tensor):
            return value
    raise LossforgeError("screening: build_inputs returned no tensor input")


class ProbeObjective:
    """L(pred) = Σ_branches w · Σ(o · valid) (or Eq. 3 per branch when normalize) on the probe samples.

    Sub-trees whose leaves do not depend on the predictions are evaluated once at construction.
    """

    def __init__(self, graph: "LossGraph", problem: ScreeningProblem, samples: int, normalize: bool = False):
        from components.search.operators import CONSTANT_VALUES, get_operator_set

        if samples > problem.samples:
            raise LossforgeError(f"screening: config asks for {samples} samples, the probe has {problem.samples}")
        self.graph = graph
        self.normalize = normalize
        self.targets = problem.targets[:samples]
        self.valid = None if problem.valid is None else problem.valid[:samples]
        self.build_inputs = problem.build_inputs
        probe = problem.init_predictions[:samples].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            inputs = problem.build_inputs(probe, self.targets)
        missing = [b for b in graph.branches if b not in inputs]
        if missing:
            raise LossforgeError(f"screening: the probe has no inputs for branch(es) {missing} of task {graph.task!r}")
        self._plans: list[tuple[str, float, object, object]] = []
        for name, branch in graph.branches.items():
            ops = get_operator_set(branch.tree.operator_set)
            branch_inputs = dict(inputs[name])
            like = _first_tensor(branch_inputs)
            for const, value in CONSTANT_VALUES.items():  # as LossTree.evaluate: full_like the first input
                if const not in branch_inputs:
                    branch_inputs[const] = torch.full_like(like, value).detach()
            dynamic = {k for k, v in branch_inputs.items() if isinstance(v, Tensor) and v.requires_grad}
            constants = {k: v.detach() for k, v in branch_inputs.items() if k not in dynamic}
            plan = self._fold(branch.tree.root, ops, dynamic, constants)
            self._plans.append((name, float(branch.weight), plan, ops))
        self._programs: list[_Program] | None = None
        # how the inputs depend on pred, found at the first manual call: (branch, input) keys and the
        # softmax dim when they are all one softmax of pred (its backward is then called directly)
        self._softmax: tuple | None = None
        self._probed = False
        self._roots: dict[tuple, Tensor] = {}  # root gradients (constant) per branch, chunk and shape
        if not normalize:
            try:
                self._programs = [_Program(plan) for _, _, plan, _ in self._plans]
            except _NoManualGradient:
                self._programs = None

    # A plan is ("const", tensor) | ("input", name) | ("op", fn, [child plans]).
    def _fold(self, node, ops, dynamic: set[str], constants: Mapping[str, Tensor]):
        if node.input is not None:
            if node.input in dynamic:
                return ("input", node.input)
            if node.input not in constants:
                raise LossforgeError(f"screening: tree input {node.input!r} is not provided by the probe")
            return ("const", constants[node.input])
        op = ops[node.op]
        children = [self._fold(c, ops, dynamic, constants) for c in node.children]
        if all(c[0] == "const" for c in children):
            with torch.no_grad():
                return ("const", _fold_fn(op.fn)(*[c[1] for c in children]))
        return ("op", op.fn, children)

    @staticmethod
    def _run(plan, inputs: Mapping[str, Tensor]) -> Tensor:
        kind = plan[0]
        if kind == "const":
            return plan[1]
        if kind == "input":
            return inputs[plan[1]]
        return plan[1](*[ProbeObjective._run(c, inputs) for c in plan[2]])

    def per_sample(self, pred: Tensor) -> Tensor:
        """Loss of each probe sample, shape `(B,)` (summed over branches)."""
        from components.search.graph import reduce_eq3

        inputs = self.build_inputs(pred, self.targets)
        total = None
        for name, weight, plan, _ in self._plans:
            o = self._run(plan, inputs[name])
            ref = _first_tensor(inputs[name])
            if o.shape != ref.shape:
                o = o.expand_as(ref)
            if self.normalize:
                value = reduce_eq3(o, self.valid)
            else:
                if self.valid is not None:
                    o = o * self.valid
                value = o.sum(dim=tuple(range(1, o.dim())))
            value = value * weight
            total = value if total is None else total + value
        return total

    def is_constant(self) -> bool:
        """True when no branch depends on the predictions at all (the gradient is identically zero)."""
        return all(plan[0] == "const" for _, _, plan, _ in self._plans)

    CHUNK_MIN_NUMEL = 1 << 17  # predictions at least this large are screened one probe sample at a time

    @property
    def manual(self) -> bool:
        """True when `loss_and_grad` uses the hand-written backward (else autograd)."""
        return self._programs is not None

    def loss_and_grad(self, pred: Tensor) -> tuple[Tensor, Tensor]:
        """(per-sample losses `(B,)`, detached; d Σ losses / d pred) for a leaf `pred` that requires grad.

        With the hand-written backward when the plan allows it (see `_Program`), else with autograd; the
        gradient is autograd's bit for bit, the losses (only ever checked for being finite) are the same
        sums, added up per sample when the probe is processed one sample at a time.
        """
        if self._programs is not None:
            try:
                return self._manual_loss_and_grad(pred)
            except Exception:  # noqa: BLE001 - e.g. an unexpected shape: autograd decides (and raises)
                self._programs = None
        with torch.enable_grad():
            losses = self.per_sample(pred)
            grad = _grad(losses, pred)
        return losses.detach(), grad

    def _manual_loss_and_grad(self, pred: Tensor) -> tuple[Tensor, Tensor]:
        softmax = self._softmax
        if softmax is None:  # inputs through autograd (and, the first time, find out whether they are a softmax)
            with torch.enable_grad():
                inputs = self.build_inputs(pred, self.targets)
            total, acc = self._manual_pass(inputs, None)
            if not self._probed:
                self._probed = True
                self._softmax = self._probe_softmax(inputs, pred)
            if not acc:
                return total, torch.zeros_like(pred)
            tensors = [t for t, _ in acc.values()]
            grads = [g for _, g in acc.values()]
            grad = torch.autograd.grad(tensors, pred, grads, allow_unused=True)[0]
            return total, torch.zeros_like(pred) if grad is None else grad
        # The inputs the plans read are all softmax(pred, dim) (checked by _probe_softmax): compute it
        # here and call its backward (what SoftmaxBackward0 computes) without the autograd engine.
        # A large probe goes one sample at a time (the samples are independent): the working set of a
        # step stays in the cache, ~25 % faster at 5×21×64², the same gradient (the per-sample loss is
        # summed as the naive reference sums it). Small probes are faster in one piece. A sample must
        # fill whole SIMD blocks (a precaution: PyTorch may compute a tensor's last partial block with
        # scalar code, so every element goes through the code it goes through in the batched tensor).
        keys, dim = softmax
        chunked = pred.numel() >= self.CHUNK_MIN_NUMEL and pred[0].numel() % 64 == 0
        chunks = range(pred.shape[0]) if chunked else (None,)
        totals = []
        grad = None
        for b in chunks:
            with torch.no_grad():
                y = torch.softmax(pred if b is None else pred[b:b + 1], dim)
            inputs: dict[str, dict[str, Tensor]] = {name: {} for name, _, _, _ in self._plans}
            for branch, key in keys:
                inputs[branch][key] = y
            for branch_inputs in inputs.values():
                branch_inputs.setdefault("", y)  # the shape reference of a branch that reads no input
            total, acc = self._manual_pass(inputs, b, sliced=True)
            totals.append(total)
            if acc:
                (tb, gb), = acc.values()
                if grad is None:
                    grad = torch.empty_like(pred, requires_grad=False)
                torch.ops.aten._softmax_backward_data.out(gb, tb, dim, pred.dtype,
                                                          grad_input=grad if b is None else grad[b:b + 1])
        total = totals[0] if len(totals) == 1 else torch.cat(totals)
        return total, torch.zeros_like(pred) if grad is None else grad

    def _manual_pass(self, inputs, chunk: int | None, sliced: bool = False) -> tuple[Tensor, dict]:
        """Forward and hand-written backward of every branch (on sample `chunk` only, if given; `sliced`:
        the inputs are that sample's already): (per-sample losses, {id(input): [input, d loss / d input]})."""
        valid = self.valid
        if chunk is not None and valid is not None:
            valid = valid[chunk:chunk + 1]
        if chunk is not None and not sliced:
            views: dict[int, Tensor] = {}

            def cut(v):
                if not isinstance(v, Tensor):
                    return v
                if id(v) not in views:
                    views[id(v)] = v[chunk:chunk + 1]
                return views[id(v)]

            inputs = {name: {k: cut(v) for k, v in branch.items()} for name, branch in inputs.items()}
        total = None
        runs = []
        with torch.no_grad():
            for (name, weight, _, _), program in zip(self._plans, self._programs):
                branch_inputs = inputs[name]
                o, saved = program.forward(branch_inputs, chunk)
                if o.shape != _first_tensor(branch_inputs).shape:
                    raise _NoManualGradient("broadcast output")
                masked = o * valid if valid is not None else o
                value = masked.sum(dim=tuple(range(1, o.dim()))) * weight
                total = value if total is None else total + value
                runs.append((program, saved, branch_inputs, weight, o))
            acc: dict[int, list] = {}
            # autograd runs the later branch first
            for program, saved, branch_inputs, weight, o in reversed(runs):
                if program.root[0] == "const":
                    continue
                key = (id(program), chunk, tuple(o.shape))
                root = self._roots.get(key)
                if root is None:
                    # what Σ_b (Σ o·valid)·w sends back to o: the per-sample w expanded over the sample
                    # (a stride-0 view, as autograd's), times valid
                    n = o.shape[0]
                    root = torch.full((n,), weight, dtype=o.dtype).view((n,) + (1,) * (o.dim() - 1)).expand(o.shape)
                    if valid is not None:
                        root = root * valid
                    self._roots[key] = root
                program.backward(saved, root, branch_inputs, acc)
        return total, acc

    def _probe_softmax(self, inputs, pred: Tensor) -> tuple | None:
        """((branch, input) keys, dim) when every prediction-dependent input the plans read is one tensor
        softmax(pred, dim) (the segmentation probe's y_hat), else None (autograd does the inputs' part)."""
        keys = []
        for (name, _, _, _), program in zip(self._plans, self._programs):
            keys += [(name, ref[1]) for _, _, refs in program.instructions for ref in refs if ref[0] == "input"]
            if program.root[0] == "input":
                keys.append((name, program.root[1]))
        if not keys:
            return None
        t = inputs[keys[0][0]][keys[0][1]]
        node = t.grad_fn
        if any(inputs[b][k] is not t for b, k in keys) or node is None or node.name() != "SoftmaxBackward0":
            return None
        nexts = node.next_functions
        if len(nexts) != 1 or getattr(nexts[0][0], "variable", None) is not pred:
            return None
        dim = int(node._saved_dim)
        if dim >= 2**63:  # the saved int64 comes back as unsigned
            dim -= 2**64
        return tuple(dict.fromkeys(keys)), dim


# --------------------------------------------------------------------------------------------------
# The objective's gradient without autograd: a hand-written backward of the folded plan.
#
# For the Table-1 operators (`autoloss_zero`, and the same ops of `cse`) the tree is run forward under
# no_grad and its gradient with respect to the prediction-dependent inputs (y_hat) is computed by
# `_Program.backward` with the very formulas autograd uses (derivatives.yaml: MulBackward0 = grad·other,
# LogBackward0 = grad / self, SqrtBackward0 = grad / (2·result), ReciprocalBackward0 = −grad·result²,
# TanhBackward0 = tanh_backward(grad, result), ExpandBackward0 = sum_to, MeanBackward1 = expand / n,
# ...), in the order the autograd engine accumulates them (a node's consumers run in reverse creation
# order, the inputs of one node in argument order; the zero gradient of sign(·) is left out, adding it
# changes no value), so the gradient is the one autograd gives, bit for bit (tests/test_rejection.py
# checks it on random trees). When the plans read nothing but softmax(pred) (the segmentation probe's
# y_hat; `ProbeObjective._probe_softmax` checks the autograd graph once), the softmax and its backward
# (`_softmax_backward_data`, what SoftmaxBackward0 calls) are called directly too. What this saves per
# SGD step: the autograd bookkeeping, the zero gradients of sign(·) inside the sign-preserving log and
# sqrt, and above all PyTorch's CPU max_pool2d (scalar code), replaced by `_Pool3`. A plan with an
# operator without a rule here, an Eq. 3 objective, or a shape that needs broadcasting uses autograd.


class _NoManualGradient(Exception):
    """The objective cannot use the hand-written backward (the autograd path is used instead)."""


_NEG_INF = float("-inf")


class _Pool3:
    """3×3 max pooling (stride 1, padding 1) over the last two dims, or min pooling (= −maxpool(−x))
    with `sign` −1, with PyTorch's gradient: its CPU backward kernel, given the indices its forward
    kernel would give (the first maximum of each window in row-major order).

    PyTorch's CPU max_pool2d forward is scalar code (~10 ms a call at 5×21×64²). Here: a separable
    maximum (rows of 3, then columns of 3) plus 0/1 float masks of the first maximum, from comparisons
    written into float tensors (the bool kernels are several times slower); the window's first maximum
    is in the first row whose maximum is the window's, at that row's first maximum, so the flat index is
    (i + dy)·W + j + dx(i + dy, j), computed exactly in float (small integers). Buffers are kept between
    steps (one instance per tree node). Inputs with a non-finite value (a −inf could tie with the −inf
    padding, a NaN with nothing) go through PyTorch's forward kernel.
    """

    def __init__(self, sign: int):
        self.sign = sign
        self.key: tuple | None = None

    def _buffers(self, x: Tensor) -> None:
        H, W = x.shape[-2], x.shape[-1]
        P = x.numel() // (H * W)
        self.key = (tuple(x.shape), x.dtype)
        new = lambda *shape: torch.empty(shape, dtype=x.dtype)  # noqa: E731
        cols = torch.full((P, H, W + 2), _NEG_INF, dtype=x.dtype)  # x with −inf side columns
        rows = torch.full((P, H + 2, W), _NEG_INF, dtype=x.dtype)  # row maxima, −inf top/bottom
        dx = torch.zeros((P, H + 2, W), dtype=x.dtype)  # per row: column offset of its first maximum
        self.shape, self.W = (P, H, W), W
        self.tmp, self.col_first, self.col_last = new(P, H, W), new(P, H, W), new(P, H, W)
        self.row_masks = [new(P, H, W) for _ in range(3)]
        self.offset, self.flat = new(P, H, W), new(P, H, W)
        self.base = torch.arange(H * W, dtype=x.dtype).view(H, W)  # i·W + j
        self.idx = torch.empty((P, 1, H, W), dtype=torch.int64)
        # views, made once
        self.x_in = cols[..., 1:-1]
        self.col_parts = (cols[..., :-2], self.x_in, cols[..., 2:])
        self.row_max = rows[:, 1:-1]
        self.row_parts = (rows[:, :-2], self.row_max, rows[:, 2:])
        self.dx_in = dx[:, 1:-1]
        self.dx_rows = (dx[:, :-2], self.dx_in, dx[:, 2:])  # rows i − 1, i, i + 1 (0 outside)

    def _max3(self, parts, out: Tensor, first: Tensor, middle: Tensor | None, last: Tensor) -> None:
        """out = max of the three parts; 0/1 float masks choosing the first maximum (in part order):
        part 0 iff it is ≥ both others, part 2 iff it is > both others, else part 1."""
        a, b, c = parts
        torch.maximum(a, b, out=self.tmp)
        torch.maximum(self.tmp, c, out=out)
        torch.gt(c, self.tmp, out=last)
        torch.ge(a, torch.maximum(b, c, out=self.tmp), out=first)
        if middle is not None:
            torch.add(first, last, out=middle).neg_().add_(1)  # 1 − first − last (0/1 values: exact)

    def fwd(self, x: Tensor):
        if not math.isfinite(float(x.sum())):  # a non-finite value (or an overflowing sum): PyTorch's kernel
            return self._aten_fwd(x)
        if self.key != (tuple(x.shape), x.dtype):
            self._buffers(x)
        planes = x.view(self.shape) if x.is_contiguous() else x.reshape(self.shape)
        if self.sign > 0:
            self.x_in.copy_(planes)
        else:
            torch.neg(planes, out=self.x_in)
        self._max3(self.col_parts, self.row_max, self.col_first, None, self.col_last)
        torch.sub(self.col_last, self.col_first, out=self.dx_in)  # −1, 0 or 1
        out = torch.empty(self.shape, dtype=x.dtype)
        up, mid, down = self.row_masks
        self._max3(self.row_parts, out, up, mid, down)
        # flat index of the first maximum: (i + dy)·W + j + dx(i + dy, j), dy = down − up
        offset = torch.mul(up, self.dx_rows[0], out=self.offset)
        offset.addcmul_(mid, self.dx_rows[1]).addcmul_(down, self.dx_rows[2])
        flat = torch.sub(down, up, out=self.flat).mul_(self.W).add_(offset).add_(self.base)
        self.idx.view(self.shape).copy_(flat)
        if self.sign < 0:
            out.neg_()
        return out.view(x.shape), (planes.view(self.idx.shape), self.idx, x)

    def bwd(self, saved, g: Tensor, need):
        return [[self._aten_bwd(saved, g)]]

    def _aten_fwd(self, x: Tensor):
        H, W = x.shape[-2], x.shape[-1]
        flat = x.reshape(-1, 1, H, W)
        if self.sign < 0:
            flat = -flat
        out, idx = torch.ops.aten.max_pool2d_with_indices(flat, [3, 3], [1, 1], [1, 1], [1, 1], False)
        out = out.reshape(x.shape)
        return (out.neg_() if self.sign < 0 else out), (flat, idx, x)

    def _aten_bwd(self, saved, g: Tensor) -> Tensor:
        flat, idx, x = saved
        go = g.reshape(flat.shape)
        if self.sign < 0:
            go = -go
        gi = torch.ops.aten.max_pool2d_with_indices_backward(go, flat, [3, 3], [1, 1], [1, 1], [1, 1], False, idx)
        return (gi.neg_() if self.sign < 0 else gi).reshape(x.shape)


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """at::sum_to (what ExpandBackward0 does): sum the dims where `shape` is 1, keepdim."""
    dims = [i for i, (s, g) in enumerate(zip(shape, grad.shape)) if s == 1 and g != 1]
    return grad.sum(dims, keepdim=True) if dims else grad


# Rules: fwd(*children) -> (output, saved); bwd(saved, grad, need) -> per child a list of gradient
# contributions (in the order autograd adds them) or None when that child needs none.


def _rule_add():
    def fwd(x, y):
        return x + y, None

    def bwd(_, g, need):
        return [[g] if need[0] else None, [g] if need[1] else None]

    return fwd, bwd


def _rule_mul():
    def fwd(x, y):
        return x * y, (x, y)

    def bwd(saved, g, need):
        x, y = saved
        return [[g * y] if need[0] else None, [g * x] if need[1] else None]

    return fwd, bwd


def _rule_neg():
    return (lambda x: (-x, None)), (lambda _, g, need: [[-g]])


def _rule_abs():
    def fwd(x):
        return torch.abs(x), x

    def bwd(x, g, need):
        return [[g * x.sgn()]]

    return fwd, bwd


def _rule_inv(eps: float):
    def fwd(x):
        r = torch.add(x, eps).reciprocal_()  # 1.0 / (x + ε) = reciprocal(x + ε) * 1.0
        return r, r

    def bwd(r, g, need):
        return [[torch.mul(g, r * r).neg_()]]  # ReciprocalBackward0: −grad · result²

    return fwd, bwd


def _rule_signed(kind: str, eps: float):
    """sign(x) · f(|x| + ε) for f = log or sqrt (the sign-preserving ops of Table 1)."""

    def fwd(x):
        s = torch.sign(x)
        a = torch.abs(x).add_(eps)
        if kind == "log":
            return torch.log(a).mul_(s), (s, a)
        r = torch.sqrt(a)
        return s * r, (s, r)

    def bwd(saved, g, need):
        s, t = saved
        if kind == "log":  # MulBackward0 (·sign), LogBackward0 (/ (|x|+ε)), AbsBackward0 (·sgn)
            return [[torch.mul(g, s).div_(t).mul_(s)]]
        return [[torch.mul(g, s).div_(2 * t).mul_(s)]]  # SqrtBackward0: grad / (2·result)

    return fwd, bwd


def _rule_exp():
    def fwd(x):
        out = torch.exp(x)
        return out, out

    return fwd, (lambda out, g, need: [[g * out]])


def _rule_tanh():
    def fwd(x):
        out = torch.tanh(x)
        return out, out

    return fwd, (lambda out, g, need: [[torch.ops.aten.tanh_backward(g, out)]])


def _rule_square():
    def fwd(x):
        return x * x, x

    def bwd(x, g, need):  # x * x: MulBackward0 gives grad·x to both operands, added one after the other
        return [[g * x, g * x]]

    return fwd, bwd


def _rule_mean(fn, dims: tuple[int, ...]):
    def fwd(x):
        out = fn(x)
        return out, x.shape

    def bwd(shape, g, need):
        kept = list(shape)
        for d in dims:
            kept[d] = 1
        n = 1
        for d in dims:
            n *= shape[d]
        # ExpandBackward0 (sum_to the kept shape), then MeanBackward1 (expand, divide by n)
        return [[_sum_to(g, torch.Size(kept)).expand(shape) / n]]

    return fwd, bwd


def _rule_pool(sign: int):
    def make():
        pool = _Pool3(sign)
        return pool.fwd, pool.bwd

    return make


def _fold_fn(fn):
    """The function that computes a constant sub-tree node: the operator's own, except 3×3 pooling,
    whose forward is `_Pool3`'s (the same values; PyTorch's CPU max_pool2d is scalar code)."""
    from components.search import operators as o

    if fn is o.azl_max_pool3 or fn is o.azl_min_pool3:
        pool = _Pool3(1 if fn is o.azl_max_pool3 else -1)
        return lambda x: pool.fwd(x)[0]
    return fn


_RULES: dict = {}


def _manual_rules() -> dict:
    """operator fn -> (fwd, bwd), for the operators with a hand-written backward."""
    if not _RULES:
        from components.search import operators as o

        _RULES.update({
            o.azl_add: _rule_add(), o.azl_mul: _rule_mul(), o.azl_neg: _rule_neg(), o.azl_abs: _rule_abs(),
            o.azl_inv: _rule_inv(o.EPS), o.azl_log: _rule_signed("log", o.EPS),
            o.azl_sqrt: _rule_signed("sqrt", o.EPS), o.azl_exp: _rule_exp(), o.azl_tanh: _rule_tanh(),
            o.azl_square: _rule_square(), o.azl_mean_nhw: _rule_mean(o.azl_mean_nhw, (-4, -2, -1)),
            o.azl_mean_c: _rule_mean(o.azl_mean_c, (-3,)), o.azl_max_pool3: _rule_pool(1),
            o.azl_min_pool3: _rule_pool(-1),
            o.cse_neg: _rule_neg(), o.cse_abs: _rule_abs(), o.cse_add: _rule_add(), o.cse_mul: _rule_mul(),
            o.cse_tanh: _rule_tanh(),
        })
    return _RULES


class _Program:
    """One branch's folded plan as a list of instructions in evaluation order (children left to right,
    then the node: the order `ProbeObjective._run` creates autograd nodes in)."""

    def __init__(self, plan):
        rules = _manual_rules()
        self.instructions: list[tuple] = []  # (fwd, bwd, child refs)
        self.root = self._emit(plan, rules)
        self._views: dict[tuple, Tensor] = {}  # per-sample views of the constants

    def _emit(self, plan, rules):
        kind = plan[0]
        if kind != "op":
            return plan  # ("const", tensor) | ("input", name)
        rule = rules.get(plan[1])
        if rule is None:
            raise _NoManualGradient(getattr(plan[1], "__name__", "operator"))
        if callable(rule):  # a rule with state (buffers): one instance per node
            rule = rule()
        refs = [self._emit(c, rules) for c in plan[2]]
        self.instructions.append((rule[0], rule[1], refs))
        return ("slot", len(self.instructions) - 1)

    def forward(self, inputs: Mapping[str, Tensor], chunk: int | None = None):
        """(output, saved values per instruction); call under no_grad. With `chunk`, the inputs are
        sample `chunk` of the probe (`[chunk:chunk+1]`) and so are the constants."""
        values: list = []
        saved: list = []

        def get(ref):
            if ref[0] == "slot":
                return values[ref[1]]
            if ref[0] == "input":
                return inputs[ref[1]]
            if chunk is None:
                return ref[1]
            key = (id(ref[1]), chunk)
            view = self._views.get(key)
            if view is None:
                view = self._views[key] = ref[1][chunk:chunk + 1]
            return view

        for fwd, _, refs in self.instructions:
            out, keep = fwd(*[get(r) for r in refs])
            values.append(out)
            saved.append(keep)
        return get(self.root), saved

    def backward(self, saved: list, grad: Tensor, inputs: Mapping[str, Tensor], acc: dict) -> None:
        """Add the gradient of Σ(output · grad) w.r.t. the dynamic inputs to `acc` ({id: [tensor, grad]})."""

        def add(ref, contributions):
            for c in contributions:
                if ref[0] == "slot":
                    k = ref[1]
                    grads[k] = c if grads[k] is None else grads[k] + c
                else:
                    t = inputs[ref[1]]
                    entry = acc.get(id(t))
                    if entry is None:
                        acc[id(t)] = [t, c]
                    else:
                        entry[1] = entry[1] + c

        grads: list = [None] * len(self.instructions)
        if self.root[0] == "const":
            return
        add(self.root, [grad])
        for k in range(len(self.instructions) - 1, -1, -1):
            g = grads[k]
            if g is None:
                continue
            grads[k] = None
            _, bwd, refs = self.instructions[k]
            need = [r[0] != "const" for r in refs]
            for ref, contributions in zip(refs, bwd(saved[k], g, need)):
                if contributions is not None:
                    add(ref, contributions)


# --------------------------------------------------------------------------------------------------
# Helpers shared by the fast and the naive implementation.


def round_significant(value: float, digits: int = 2) -> float:
    """Round to `digits` significant digits (0 stays 0)."""
    if value == 0 or not math.isfinite(value):
        return float(value)
    return float(f"{value:.{digits - 1}e}")


_PROJECTIONS: dict[int, Tensor] = {}


def _projection(size: int) -> Tensor:
    """A fixed random direction of `size` elements (seed 0, float64), the same in every process."""
    if size not in _PROJECTIONS:
        generator = torch.Generator().manual_seed(0)
        _PROJECTIONS[size] = torch.randn(size, generator=generator, dtype=torch.float64)
    return _PROJECTIONS[size]


def fingerprint_from_grad(grad: Tensor) -> tuple[float, ...] | None:
    """B per-sample L2 norms, then B signed projections on a fixed random direction, 2 significant digits.

    The norms alone are blind to the gradient's direction: -L (which ascends) would share L's fingerprint
    and inherit its verdict and proxy score. The projections carry the sign (and some of the direction).
    None if any value is non-finite.
    """
    flat = grad.detach().flatten(1).double()
    norms = torch.linalg.vector_norm(flat, dim=1).tolist()
    projections = (flat @ _projection(flat.shape[1])).tolist()
    values = norms + projections
    if not all(math.isfinite(v) for v in values):
        return None
    return tuple(round_significant(v, 2) + 0.0 for v in values)  # + 0.0: -0.0 -> 0.0


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    if len(msg) > 200:
        msg = msg[:197] + "..."
    return f"error: {type(exc).__name__}: {msg}" if msg else f"error: {type(exc).__name__}"


def correlation_gain(problem: ScreeningProblem, initial: Tensor, final: Tensor | None, gain: str = "normalized",
                     *, baseline: tuple | None = None):
    """g of the protocol for predictions moved from `initial` to `final` (the first B probe samples).

    "absolute": mean_b ξ(final) − ξ(initial); "normalized": mean over samples with headroom of
    (ξ(final) − ξ(initial)) / (ξ(perfect) − ξ(initial)).
    (Internal: with `final` None it returns the baseline (ξ(initial), ξ(perfect)) that `baseline=`
    takes back, so a probe's constant metrics are computed once.)
    """
    n = initial.shape[0]
    targets = problem.targets[:n]
    with torch.inference_mode():
        if baseline is None:
            before = problem.metric(initial, targets).double()
            best = None
            if gain == "normalized" and problem.perfect_predictions is not None:
                best = problem.metric(problem.perfect_predictions[:n], targets).double()
            if final is None:
                return before, best
        else:
            before, best = baseline
        after = problem.metric(final, targets).double()
        if gain == "absolute":
            return float((after - before).mean())
        if gain != "normalized":
            raise LossforgeError(f"screening: gain must be one of {', '.join(GAIN_RULES)}, got {gain!r}")
        if problem.perfect_predictions is None:
            raise LossforgeError("screening: gain 'normalized' needs the problem's perfect_predictions "
                                 "(or use screening.gain: absolute)")
    headroom = best - before
    keep = headroom > HEADROOM_EPS
    if not bool(keep.any()):
        raise LossforgeError(f"screening: no probe sample can improve on {problem.metric_name or 'the metric'} "
                             "(the initial predictions already score as the targets); use another probe "
                             "or screening.gain: absolute")
    return float(((after - before)[keep] / headroom[keep]).mean())


_BASELINES: "weakref.WeakKeyDictionary[ScreeningProblem, dict]" = weakref.WeakKeyDictionary()


def _score(problem: ScreeningProblem, initial: Tensor, final: Tensor, config: ScreeningConfig) -> float:
    return correlation_gain(problem, initial, final, config.gain)


def _probe_score(problem: ScreeningProblem, final: Tensor, config: ScreeningConfig) -> float:
    """g of `final` against the probe's initial predictions; ξ(initial) and ξ(perfect) (the same for every
    candidate) are computed once per problem."""
    n = final.shape[0]
    initial = problem.init_predictions[:n].detach()
    cached = _BASELINES.setdefault(problem, {})
    key = (n, config.gain)
    if key not in cached:
        cached[key] = correlation_gain(problem, initial, None, config.gain)
    return correlation_gain(problem, initial, final, config.gain, baseline=cached[key])


def _all_finite(values: Tensor) -> bool:
    """All elements finite (for a small tensor such as the per-sample losses)."""
    return all(math.isfinite(v) for v in values.tolist())


def _tensor_finite(values: Tensor) -> bool:
    """All elements finite, in one pass (min and max are NaN/Inf if any element is)."""
    return all(math.isfinite(float(v)) for v in torch.aminmax(values.detach()))


def _bit_equal(a: Tensor, b: Tensor) -> bool:
    """Same bits (unlike torch.equal, −0.0 ≠ +0.0 and a NaN equals the same NaN)."""
    if a.dtype == torch.float32:
        return torch.equal(a.view(torch.int32), b.view(torch.int32))
    if a.dtype == torch.float64:
        return torch.equal(a.view(torch.int64), b.view(torch.int64))
    return False


def _verdict(score: float, threshold: float) -> tuple[bool, str]:
    return (True, ACCEPTED) if score >= threshold else (False, BELOW_THRESHOLD)


# --------------------------------------------------------------------------------------------------
# The fast implementation.


def initial_gradient(graph: "LossGraph", problem: ScreeningProblem, samples: int | None = None):
    """(objective, pred leaf, loss (B,), gradient) at the initial predictions, un-normalised objective."""
    samples = problem.samples if samples is None else samples
    objective = ProbeObjective(graph, problem, samples, normalize=False)
    pred = problem.init_predictions[:samples].detach().clone().requires_grad_(True)
    losses, grad = objective.loss_and_grad(pred)
    return objective, pred, losses, grad


_REFERENCE_NORMS: dict[tuple[str, int], float] = {}


def reference_gradient_norm(problem: ScreeningProblem, samples: int) -> float | None:
    """‖∇ L_ref‖ at the initial predictions of the first `samples` probe samples (cached per probe key)."""
    if problem.reference is None:
        return None
    key = (problem.key, samples)
    if key not in _REFERENCE_NORMS:
        _, _, _, grad = initial_gradient(problem.reference, problem, samples)
        _REFERENCE_NORMS[key] = float(torch.linalg.vector_norm(grad.detach().double()))
    return _REFERENCE_NORMS[key]


def gradient_ratio(grad: Tensor, problem: ScreeningProblem, samples: int) -> float | None:
    """‖∇ L_candidate‖ / ‖∇ L_ref‖ at the initial predictions; None without a usable reference."""
    ref = reference_gradient_norm(problem, samples)
    if ref is None or not ref > 0 or not math.isfinite(ref):
        return None
    return float(torch.linalg.vector_norm(grad.detach().double())) / ref


def gradient_scale_ok(grad: Tensor, problem: ScreeningProblem, config: ScreeningConfig) -> bool:
    """The gradient-scale check (module docstring): True when off, without a reference, or within the ratio."""
    limit = config.max_gradient_ratio
    if limit is None:
        return True
    ratio = gradient_ratio(grad, problem, config.samples)
    return ratio is None or 1.0 / limit <= ratio <= limit


def _grad(losses: Tensor, pred: Tensor) -> Tensor:
    """d(Σ losses)/d pred; zeros when the loss does not depend on pred."""
    if not losses.requires_grad:
        return torch.zeros_like(pred)
    grad = torch.autograd.grad(losses.sum(), pred, allow_unused=True)[0]
    return torch.zeros_like(pred) if grad is None else grad


def screen(
    graph: "LossGraph",
    problem: ScreeningProblem,
    config: ScreeningConfig | None = None,
    cache: "ScreeningCache | None" = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> ScreeningResult:
    """Screen one candidate with the loss-rejection protocol; never raises for a bad candidate.

    With a cache, a candidate whose gradient fingerprint was already screened under the same config
    reuses that outcome (`cached=True`), and a new outcome is stored. `progress(step, steps)` is called
    every few SGD steps (for progress bars).
    """
    config = config or ScreeningConfig()
    start = time.perf_counter()
    fingerprint = None
    try:
        result = _screen(graph, problem, config, cache, start, progress)
    except Exception as exc:  # noqa: BLE001 - a bad candidate must never crash the caller
        result = ScreeningResult(False, None, _one_line(exc), fingerprint, time.perf_counter() - start)
    return result


def _screen(graph, problem, config: ScreeningConfig, cache, start: float, progress=None) -> ScreeningResult:
    n = config.samples
    objective, pred, losses, grad = initial_gradient(graph, problem, n)
    digest = config.digest() if cache is not None else None

    def done(accepted, score, reason, fp, steps):
        res = ScreeningResult(accepted, score, reason, fp, time.perf_counter() - start, steps)
        if cache is not None and fp is not None:
            cache.put_screening(fp, res, digest, graph)
        return res

    if not _all_finite(losses):
        return done(False, None, NAN_LOSS, None, 0)
    fingerprint = fingerprint_from_grad(grad)
    if fingerprint is None:  # a NaN/Inf element makes its sample's norm NaN/Inf
        return done(False, None, NAN_GRADIENT, None, 0)

    if cache is not None:
        hit = cache.get_screening(fingerprint, digest)
        if hit is not None:
            return replace(hit, seconds=time.perf_counter() - start, cached=True, fingerprint=fingerprint, steps_run=0)

    if objective.is_constant() or not bool(grad.any()):
        # SGD never moves the predictions: g = 0 exactly.
        if config.threshold <= 0:
            return done(True, 0.0, ACCEPTED, fingerprint, 0)
        return done(False, 0.0, ZERO_GRADIENT, fingerprint, 0)

    if not gradient_scale_ok(grad, problem, config):
        return done(False, None, GRADIENT_SCALE, fingerprint, 0)

    if config.normalize:  # the first step's gradient differs by the Eq. 3 scaling: recompute it
        objective = ProbeObjective(graph, problem, n, normalize=True)
        with torch.enable_grad():
            grad = _grad(objective.per_sample(pred), pred)

    lr, momentum = config.lr, config.momentum
    buf: Tensor | None = None
    steps_run = 0
    same = False  # the last update left pred bit-for-bit unchanged: its loss and gradient are unchanged too
    spare: Tensor | None = None
    settled = False  # ... and the momentum buffer reached a fixed point of buf ← momentum·buf + grad
    for step in range(config.steps):
        if step > 0 and not same:
            losses, grad = objective.loss_and_grad(pred)
            if not _all_finite(losses):
                return done(False, None, NAN_LOSS, fingerprint, step)
            low, high = (float(v) for v in torch.aminmax(grad))  # one pass; NaN/Inf show in min or max
            if not (math.isfinite(low) and math.isfinite(high)):
                return done(False, None, NAN_GRADIENT, fingerprint, step)
            gmax = max(-low, high)
        elif step == 0:
            gmax = 1.0  # a zero gradient at step 0 was handled above
        with torch.no_grad():
            if buf is None:
                buf = grad.detach().clone()
            elif same:
                new_buf = torch.mul(buf, momentum).add_(grad)
                settled = _bit_equal(new_buf, buf)
                buf = new_buf
            else:
                buf.mul_(momentum).add_(grad)
            if spare is None:
                spare = torch.empty_like(pred)
            moved = torch.add(pred, buf, alpha=-lr, out=spare)
            same = _bit_equal(moved, pred)
            if same and config.stop_when_frozen and (gmax == 0.0 or settled):
                # The update changes no value and the next one is the same again (a zero gradient
                # with a shrinking momentum, or a momentum at its fixed point): frozen for good.
                break
            pred, spare = moved.requires_grad_(True), pred  # two buffers, used in turn
        steps_run = step + 1
        if progress is not None and (steps_run % 10 == 0 or steps_run == config.steps):
            progress(steps_run, config.steps)
        if config.early_check_step is not None and steps_run == config.early_check_step < config.steps:
            if not _tensor_finite(pred):
                return done(False, None, NAN_LOSS, fingerprint, steps_run)
            g_early = _probe_score(problem, pred.detach(), config)
            if g_early <= config.early_check_min_gain:
                return done(False, g_early, EARLY_REJECT, fingerprint, steps_run)

    final = pred.detach()
    if config.steps > 0:
        # the loss/gradient at the final predictions is never used by SGD; only finiteness matters
        if not _tensor_finite(final):
            return done(False, None, NAN_LOSS, fingerprint, steps_run)
    score = _probe_score(problem, final, config)
    accepted, reason = _verdict(score, config.threshold)
    return done(accepted, score, reason, fingerprint, steps_run)


# --------------------------------------------------------------------------------------------------
# The naive reference.


def screen_naive(graph: "LossGraph", problem: ScreeningProblem, config: ScreeningConfig | None = None) -> ScreeningResult:
    """Reference protocol: one sample at a time, `graph.total` + torch.optim.SGD, every step, no cache,
    no folding, no early exit. Gives the same reasons as `screen` (decided after the full run)."""
    config = config or ScreeningConfig()
    start = time.perf_counter()
    try:
        return _screen_naive(graph, problem, config, start)
    except Exception as exc:  # noqa: BLE001 - a bad candidate must never crash the caller
        return ScreeningResult(False, None, _one_line(exc), None, time.perf_counter() - start)


def _naive_loss(graph, problem: ScreeningProblem, pred: Tensor, target: Tensor, valid, normalize: bool) -> Tensor:
    inputs = problem.build_inputs(pred, target)
    if normalize:
        return graph.total(inputs, valid).sum()
    total = 0.0
    for name, branch in graph.branches.items():
        o = branch.tree.evaluate(inputs[name])
        if valid is not None:
            o = o * valid
        total = total + branch.weight * o.sum()
    return total


def _screen_naive(graph, problem, config: ScreeningConfig, start: float) -> ScreeningResult:
    n = config.samples
    if n > problem.samples:
        raise LossforgeError(f"screening: config asks for {n} samples, the probe has {problem.samples}")
    finals, firsts, zero_first = [], [], []
    first_bad: tuple[int, int, str] | None = None  # (step, order, reason): the earliest NaN/Inf event
    for b in range(n):
        pred = problem.init_predictions[b : b + 1].detach().clone().requires_grad_(True)
        target = problem.targets[b : b + 1]
        valid = None if problem.valid is None else problem.valid[b : b + 1]
        optimizer = torch.optim.SGD([pred], lr=config.lr, momentum=config.momentum)
        for step in range(max(config.steps, 1)):
            optimizer.zero_grad()
            loss = _naive_loss(graph, problem, pred, target, valid, config.normalize)
            if torch.is_tensor(loss) and loss.requires_grad:
                loss.backward()
            if pred.grad is None:
                pred.grad = torch.zeros_like(pred)
            events = []
            if not math.isfinite(float(loss.detach() if torch.is_tensor(loss) else loss)):
                events.append((step, 0, NAN_LOSS))
            if not bool(torch.isfinite(pred.grad).all()):
                events.append((step, 1, NAN_GRADIENT))
            if events and (first_bad is None or events[0] < first_bad):
                first_bad = events[0]
            if step == 0:
                g0 = pred.grad.clone()
                if config.normalize:  # the fingerprint uses the un-normalised objective
                    raw = _naive_loss(graph, problem, pred, target, valid, False)
                    g0 = torch.autograd.grad(raw, pred)[0] if torch.is_tensor(raw) and raw.requires_grad else g0 * 0
                firsts.append(g0.detach())
                zero_first.append(not bool(g0.any()))
            if config.steps > 0:
                optimizer.step()
        finals.append(pred.detach())
    elapsed = time.perf_counter() - start
    fingerprint = fingerprint_from_grad(torch.cat(firsts))
    if first_bad is not None:
        return ScreeningResult(False, None, first_bad[2], None if first_bad[0] == 0 else fingerprint, elapsed, config.steps)
    if any(not bool(torch.isfinite(f).all()) for f in finals):
        return ScreeningResult(False, None, NAN_LOSS, fingerprint, elapsed, config.steps)
    score = _score(problem, problem.init_predictions[:n].detach(), torch.cat(finals), config)
    if all(zero_first) and config.threshold > 0:
        return ScreeningResult(False, score, ZERO_GRADIENT, fingerprint, time.perf_counter() - start, config.steps)
    if config.max_gradient_ratio is not None and problem.reference is not None:
        first = torch.stack([_naive_first_gradient(graph, problem, b, config) for b in range(n)])
        if not gradient_scale_ok(first, problem, config):
            return ScreeningResult(False, None, GRADIENT_SCALE, fingerprint, time.perf_counter() - start, config.steps)
    accepted, reason = _verdict(score, config.threshold)
    return ScreeningResult(accepted, score, reason, fingerprint, time.perf_counter() - start, config.steps)


def _naive_first_gradient(graph, problem: ScreeningProblem, b: int, config: ScreeningConfig) -> Tensor:
    """The un-normalised gradient of probe sample `b` at its initial prediction (plain autograd)."""
    pred = problem.init_predictions[b : b + 1].detach().clone().requires_grad_(True)
    valid = None if problem.valid is None else problem.valid[b : b + 1]
    loss = _naive_loss(graph, problem, pred, problem.targets[b : b + 1], valid, False)
    if not (torch.is_tensor(loss) and loss.requires_grad):
        return torch.zeros_like(pred)
    return torch.autograd.grad(loss, pred)[0]


__all__ = [
    "ScreeningProblem",
    "ScreeningConfig",
    "ScreeningResult",
    "ProbeObjective",
    "correlation_gain",
    "GAIN_RULES",
    "screen",
    "screen_naive",
    "initial_gradient",
    "fingerprint_from_grad",
    "round_significant",
    "REASONS",
]

