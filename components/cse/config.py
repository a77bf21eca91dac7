"""Settings of the `cse` search method: `params.yaml`'s `cse:` section (checked by components/params.py).

Defaults: the evolution of AutoLoss-Zero's appendix (K = 20, T = 5 %, P = 2500, depth 3) over the `cse`
operators, the convergence checks of components/cse/convergence.py, and a CPU-sized optimisation simulation
(components/cse/simulation.py: 2 images per class, 30 SGD steps at batch 2, lr 0.02, AP gain > 0 and ≥ 0.25× the AP
of CE + GIoU; ~9 s per candidate with the CPU detector, measured). `simulation: false` turns the simulation stage
off (convergence checks only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from components.errors import LossforgeError


@dataclass(frozen=True)
class CSEConfig:
    """The `cse:` section (see the module docstring and params.yaml)."""

    # evolution (components/search/evolution.py) over the detection_cse branches cls and reg
    initial_population: int = 20
    tournament_fraction: float = 0.05
    min_tournament_size: int = 2
    max_population: int = 2500
    depth: int = 3
    max_attempts: int = 100_000  # rejected trees (per branch) / simulations in a row before the search stops
    stall_warning_every: int = 500  # a warning after this many rejections in a row (0 = never)
    seed_losses: tuple[str, ...] = ()  # handed out first: names of components/cse/published.py or loss JSON files
    # convergence-property verification (components/cse/convergence.py)
    logit_samples: int = 32
    box_samples: int = 64
    min_gradient: float = 1e-4
    gradient_tolerance: float = 1e-3
    # model-optimisation simulation (components/cse/simulation.py)
    simulation: bool = True
    images_per_class: int = 2
    simulation_iterations: int = 30
    simulation_batch_size: int = 2
    simulation_lr: float = 0.02
    min_ap_gain: float = 0.0  # accept when AP_after − AP_before (untrained detector) > this ...
    min_ap_ratio: float = 0.25  # ... and AP_after >= this × the AP of CE + GIoU in the same simulation (0: off)

    def __post_init__(self) -> None:
        if isinstance(self.seed_losses, list):
            object.__setattr__(self, "seed_losses", tuple(self.seed_losses))
        positive = ("initial_population", "min_tournament_size", "max_population", "depth", "max_attempts",
                    "logit_samples", "box_samples", "images_per_class", "simulation_iterations",
                    "simulation_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise LossforgeError(f"{name}: must be >= 1 (got {getattr(self, name)!r})")
        if not 0 < self.tournament_fraction <= 1:
            raise LossforgeError(f"tournament_fraction: must be in (0, 1] (got {self.tournament_fraction!r})")
        if self.depth > 10:
            raise LossforgeError(f"depth: must be <= 10 (got {self.depth!r})")
        if self.stall_warning_every < 0:
            raise LossforgeError(f"stall_warning_every: must be >= 0 (got {self.stall_warning_every!r})")
        if self.min_ap_ratio < 0:
            raise LossforgeError(f"min_ap_ratio: must be >= 0 (got {self.min_ap_ratio!r})")
        for name in ("min_gradient", "gradient_tolerance", "simulation_lr"):
            if not getattr(self, name) > 0:
                raise LossforgeError(f"{name}: must be > 0 (got {getattr(self, name)!r})")
        seeds = self.seed_losses
        if not all(isinstance(s, str) and s for s in seeds) or len(seeds) > self.initial_population:
            raise LossforgeError(f"seed_losses: expected at most initial_population names or loss JSON files "
                                 f"(got {list(self.seed_losses)!r})")
        from components.cse.published import PUBLISHED

        for name in self.seed_losses:
            if name not in PUBLISHED and not (name.endswith(".json") and Path(name).is_file()):
                raise LossforgeError(f"seed_losses: {name!r} is neither an existing loss JSON file nor one of "
                                     f"{', '.join(PUBLISHED)}")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["seed_losses"] = list(self.seed_losses)
        return out


__all__ = ["CSEConfig"]
