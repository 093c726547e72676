"""The study's configuration: one frozen record of every setting, and the
presets (quick, medium, full)."""

import dataclasses
import numbers

OPTIMIZERS = ("adamw", "blockwise_sum", "blockwise_mean")
"""The optimisers a configuration may name (see `make_optimizer`)."""

# the JSON's short names (docs/theory.md, section 7), added to the study JSON's
# `config` next to the long ones
_SHORT = {"n": "tokens", "d": "dim", "K": "steps", "J": "nodes", "M": "particles"}
# settings written to the JSON only when given (`None`: the main grid's value)
_OPTIONAL = ("sweep_particles", "sweep_nodes", "sweep_steps", "sweep_record_every")
# settings that are no preset key: written to the JSON only when given
_HIDDEN = ("limit_memory_bytes",)


def condition_name(dim, tokens, opt, causal=False) -> str:
    """The name of a (task, optimiser) condition, e.g. `d4-n8-adamw-causal`."""
    return f"d{dim}-n{tokens}-{opt}" + ("-causal" if causal else "")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudyConfig:
    """Every setting of one run of the study (docs/theory.md, section 7).

    **Arguments:**

    - `seed`: the root of every PRNG key of the study.
    - `head_dim`: `k`, the heads' inner dimension.
    - `clusters`: clusters of the denoising task.
    - `beta`: the attention's inverse temperature.
    - `eta`: the common per-block step of every optimiser.
    - `weight_decay`: the optimisers' weight decay.
    - `restarts`: starts of the adversarial ascent per initialisation.
    - `test_points`: random test points per initialisation and probe.
    - `limit_block`: test particles per solve of the limit.
    - `adversarial_steps`, `adversarial_step_size`: the ascent's steps.
    - `dim`, `tokens`, `batch`: `d`, `n` and the batch size of the main condition.
    - `steps`, `record_every`: `K` training steps, recorded every so many.
    - `nodes`, `particles`: the limit's `J` depth nodes and `M` particles per node.
    - `L`, `H`: the main grid's depths and head counts.
    - `inits`: `R` initialisations per grid point; `probes`: token sets.
    - `n_sweep`, `causal_sweep`, `d_sweep`: the sweeps over `n` (masked too
      when `causal_sweep`) and over `d` (per optimiser).
    - `optimizers`: the optimisers (the first is the main condition's).
    - `sweep_LH`: the grid point `(L, H)` of the sweeps.
    - `sweep_particles`, `sweep_nodes`, `sweep_steps`, `sweep_record_every`:
      the sweeps' own reference and training length (`None`: the main grid's).
    - `limit_memory_bytes`: bytes one solve of the limit's test particles may
      take (`None`: 2e9).

    Lists are stored as tuples.

    **Raises:** `ValueError` naming the setting that is out of range.
    """

    seed: int = 2026
    head_dim: int = 4
    clusters: int = 3
    beta: float = 1.0
    eta: float = 0.02
    weight_decay: float = 1e-3
    restarts: int = 2
    test_points: int = 18
    limit_block: int = 18
    adversarial_steps: int = 4
    adversarial_step_size: float = 0.15
    dim: int
    tokens: int
    batch: int
    steps: int
    record_every: int
    nodes: int
    particles: int
    sweep_particles: int | None = None
    L: tuple[int, ...]
    H: tuple[int, ...]
    inits: int
    probes: int
    n_sweep: tuple[int, ...] = ()
    causal_sweep: bool = False
    d_sweep: tuple[int, ...] = ()
    optimizers: tuple[str, ...] = ("adamw",)
    sweep_LH: tuple[int, int]
    sweep_nodes: int | None = None
    sweep_steps: int | None = None
    sweep_record_every: int | None = None
    limit_memory_bytes: float | None = None

    def __post_init__(self):
        for name in ("L", "H", "n_sweep", "d_sweep", "optimizers", "sweep_LH"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        positive = (
            "head_dim", "clusters", "restarts", "test_points", "limit_block",
            "dim", "tokens", "batch", "steps", "record_every", "nodes",
            "particles", "probes",
        )  # fmt: skip
        for name in positive + _OPTIONAL:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, numbers.Integral) or value < 1):
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        if self.inits < 2:
            raise ValueError(f"`inits` must be at least 2 (a bias needs two), got {self.inits}")
        if self.restarts > self.test_points:
            raise ValueError(
                f"`restarts` ({self.restarts}) must not exceed `test_points` ({self.test_points})"
            )
        for name in ("L", "H", "n_sweep", "d_sweep", "sweep_LH"):
            if any(not isinstance(v, numbers.Integral) or v < 1 for v in getattr(self, name)):
                raise ValueError(f"`{name}` must hold positive ints, got {getattr(self, name)}")
        if not self.L or not self.H:
            raise ValueError("`L` and `H` must not be empty")
        if len(self.sweep_LH) != 2:
            raise ValueError(f"`sweep_LH` must be one grid point (L, H), got {self.sweep_LH}")
        if not self.optimizers or any(o not in OPTIMIZERS for o in self.optimizers):
            raise ValueError(f"`optimizers` must be among {OPTIMIZERS}, got {self.optimizers}")

    def sweep(self, name: str):
        """The sweeps' value of `name` (`"nodes"`, `"particles"`, `"steps"`,
        `"record_every"`): `sweep_<name>` where given, else the main grid's."""
        value = getattr(self, "sweep_" + name)
        return getattr(self, name) if value is None else value

    @property
    def main_condition(self) -> str:
        """The name of the main condition (the grid's)."""
        return condition_name(self.dim, self.tokens, self.optimizers[0])

    def to_json(self) -> dict:
        """The settings as a JSON object (lists, no unset optional settings)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _OPTIONAL + _HIDDEN and value is None:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json(cls, data) -> "StudyConfig":
        """The configuration of a JSON object written by `to_json` (the study
        JSON's `config`, whose short names `n, d, K, J, M` are dropped).

        **Raises:** `ValueError` naming unknown settings, or one that disagrees
        with its short name.
        """
        data = dict(data)
        for short, long in _SHORT.items():
            if short in data and long in data and data.pop(short) != data[long]:
                raise ValueError(f"config: `{short}` disagrees with `{long}`")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"config: unknown settings {unknown}")
        return cls(**data)

    def study_json(self) -> dict:
        """`to_json` with the short names `n, d, K, J, M` (the study JSON's `config`)."""
        return dict(self.to_json(), **{s: getattr(self, long) for s, long in _SHORT.items()})


def _sweeps_apart(cfg: "StudyConfig") -> bool:
    """Whether the sweeps are trained or referenced unlike the main grid
    (`sweep_nodes`, `sweep_particles`, `sweep_steps`, `sweep_record_every`)."""
    return any(
        cfg.sweep(k) != getattr(cfg, k) for k in ("nodes", "particles", "steps", "record_every")
    )


def sweep_condition_name(cfg: "StudyConfig", dim, tokens, opt, causal=False) -> str:
    """The condition that holds a sweep point: the main condition's own name
    when the sweeps share its settings (the point joins its grid), else a
    separate `-sweep` condition, so that every point of a sweep is measured
    alike."""
    name = condition_name(dim, tokens, opt, causal)
    return name + "-sweep" if name == cfg.main_condition and _sweeps_apart(cfg) else name


# --- presets ------------------------------------------------------------------
# (every setting not given below is StudyConfig's default: seed 2026, k = 4,
# 3 clusters, beta = 1, eta = 0.02, weight decay 1e-3, 2 restarts, 18 random
# test points per initialisation and probe (the stencil count of d = 4, which
# every d shares), limit solves of 18 test particles (a third to a fifth of the
# cost per particle of solves of 288, see `limit_eval_blocks`), 4 ascent steps
# of 0.15)
PRESETS = {
    # minutes: the main condition only, on a grid small enough (L H <= 8) for a
    # J M = 512 reference; what it can show is limited, and it says so
    "quick": StudyConfig(
        dim=4,
        tokens=8,
        batch=4,
        steps=20,
        record_every=10,
        nodes=8,
        particles=64,
        sweep_particles=64,
        L=(1, 2),
        H=(2, 4),
        inits=4,
        probes=2,
        n_sweep=(),
        causal_sweep=False,
        d_sweep=(),
        optimizers=("adamw",),
        sweep_LH=(2, 4),
    ),
    # 25 min on 2 cores (measured, idle, 2026-11-24): the grid L H <= 64
    # against J M = 2048 (the limit's Monte-Carlo error of the state is about
    # sqrt(L H / (J M)) of the fluctuation), the sweeps at (2, 4), two values
    # each of n and d
    "medium": StudyConfig(
        dim=4,
        tokens=8,
        batch=4,
        steps=60,
        record_every=15,
        nodes=16,
        particles=128,
        sweep_particles=64,
        L=(1, 2, 4),
        H=(4, 16),
        inits=6,
        probes=2,
        n_sweep=(4, 16),
        causal_sweep=True,
        d_sweep=(2, 8),
        optimizers=OPTIMIZERS,
        sweep_LH=(2, 4),
    ),
    # 53 min on 2 cores (measured, idle, 2026-11-24): the medium grid
    # against the same reference, with 16 initialisations and K = 200 steps
    # (the horizon); the sweeps at (2, 4) with their own shorter training
    # (`sweep_*`), n = 4 and 32 masked and not, d = 2 and 32 per optimiser.
    # A finer reference (J M >> 2048) or a grid to L H = 1024 needs a GPU
    # (see benchmarks/README.md)
    "full": StudyConfig(
        dim=4,
        tokens=8,
        batch=4,
        steps=200,
        record_every=40,
        nodes=16,
        particles=128,
        L=(1, 2, 4),
        H=(4, 16),
        inits=16,
        probes=2,
        n_sweep=(4, 32),
        causal_sweep=True,
        d_sweep=(2, 32),
        optimizers=OPTIMIZERS,
        sweep_LH=(2, 4),
        sweep_nodes=8,
        sweep_particles=128,
        sweep_steps=60,
        sweep_record_every=30,
    ),
    # for one GPU (not yet run on one: benchmarks/device_check.sh tries it after
    # the quick preset and the full preset's main grid): the full preset's main
    # grid extended to L H = 1024 against a reference of J M = 16384 (its
    # Monte-Carlo error about a quarter of the fluctuation at the largest
    # point), no sweeps
    "gpu": StudyConfig(
        dim=4,
        tokens=8,
        batch=4,
        steps=200,
        record_every=40,
        nodes=32,
        particles=512,
        L=(1, 2, 4, 8, 16),
        H=(4, 16, 64),
        inits=16,
        probes=2,
        optimizers=("adamw",),
        sweep_LH=(2, 4),
    ),
}
