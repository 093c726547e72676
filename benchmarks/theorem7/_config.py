"""The presets of the study: frozen, so that a result file names exactly what
produced it."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Theorem7Config:
    """Every size and hyperparameter of one run of the study.

    The task is the convergence study's (`benchmarks/scaling`): in-context
    denoising in `dim` dimensions with `tokens` tokens around `clusters` centres,
    rescaled to RMS norm one; the law `nu_0` of a head is `Q, K, V` Xavier
    uniform and `O = V`; AdamW with the per-entry step `eta / sqrt(dim *
    head_dim)` and weight decay `weight_decay`, batch `batch`, one data stream
    shared by every initialisation."""

    name: str
    seed: int = 2026
    dim: int = 4
    head_dim: int = 4
    tokens: int = 8
    clusters: int = 3
    beta: float = 1.0
    eta: float = 0.02
    weight_decay: float = 1e-3
    batch: int = 4
    probes: int = 1
    """token sets at which every quantity is measured"""
    test_points: int = 8
    """test particles per token set, uniform in the ball that holds the tokens"""
    # part 1: the fluctuation among initialisations, no limit needed
    L: tuple[int, ...] = (4, 8, 16)
    H: tuple[int, ...] = (4, 16)
    inits: int = 16
    steps: int = 40
    fit_min_L: int = 4
    """the fits use the depths from this one on: below it the spread is
    pre-asymptotic (one Euler step does not yet carry the flow's amplification
    of early fluctuations: at `H = 4` it is about as large at `L = 1` as at
    `L = 4`)"""
    # part 2: the bias of the mean at initialisation against the exact limit
    bias_L: tuple[int, ...] = (2, 4, 8, 16, 32)
    bias_H: int = 4
    bias_inits: int = 128
    reference_M: int = 2**12
    """the limit's reference is a scrambled Sobol sample of `nu_0` of `4
    reference_M` heads; its distance to the solution with `reference_M` heads
    bounds its error (about twice its own, for an error like `M^-1/2`)"""
    reference_rtol: float = 1e-10
    splits: int = 16
    """random split-halves averaged in the bias estimate"""
    # part 2 after training: the rate of the bias from the means at successive
    # depths (no trained limit needed), `H = bias_H`, `steps` steps
    trained_bias_L: tuple[int, ...] = ()
    """empty in the quick preset: its fit from four depths is too wide to
    tell (about 30 s more of the main job); `--trained-L 4,8,16,32` runs it"""
    trained_bias_inits: int = 256
    trained_bias_groups: int = 16
    trained_bias_more_H: tuple[int, ...] = ()
    """more head counts for part 2 after training, besides `bias_H` (the same
    initialisations per depth and the same stream), at the depths
    `trained_bias_more_L`"""
    trained_bias_more_L: tuple[int, ...] = ()
    """groups of initialisations whose means make the U-statistic and the
    jackknife"""
    # part 3: the sup over token sets against the number of tokens
    uniform_n: tuple[int, ...] = (4, 8, 16, 32)
    uniform_L: int = 4
    uniform_H: int = 4
    uniform_inits: int = 8
    ascent_steps: int = 16
    ascent_restarts: int = 2
    ascent_step_size: float = 0.05
    """step of the ascent on token positions, a fraction of the ball's radius"""
    causal: tuple[bool, ...] = (False, True)
    boots: int = 400
    """bootstrap resamples of the bias's interval"""
    # part 4: the fluctuation along training, one shared stream against
    # independent streams (the control)
    global_LH: tuple[tuple[int, int], ...] = ((4, 4),)
    global_inits: int = 8
    global_checkpoints: tuple[int, ...] = (0, 16, 63, 250, 1000)
    global_decay: float = 100.0
    """the per-entry step `eta / sqrt(d k) / sqrt(1 + k / global_decay)`"""
    global_fit_from: int = 250
    """the fits of the spread in `k` use the checkpoints from this one on"""
    # part 5: Lemma 6 and `d`, AdamW against blockwise AdamW, Adam's `eps`
    lemma6_d: tuple[int, ...] = ()
    """empty in the quick preset: each `(d, optimiser)` compiles its training
    (about 10-20 s on 2 cores), too much for the main job's two minutes"""
    lemma6_head_dim: int = 4
    lemma6_L: int = 4
    lemma6_H: int = 4
    lemma6_inits: int = 8
    lemma6_steps: int = 20
    lemma6_optimizers: tuple[str, ...] = ("adamw", "blockwise_sum")
    lemma6_eps: tuple[float, ...] = (1e-8,)
    lemma6_fit_min_d: int = 2
    """the second fit in `d` uses the dimensions from this one on"""
    lemma6_eta_entry: float = 0.005
    """AdamW's per-entry step at every `d` (`eta / sqrt(4 k)`: part 1's at `d = 4`)"""

    # part 6: the adjoint against the distance from the tokens (part 1's models)
    adjoint_L: int = 4
    adjoint_H: tuple[int, ...] = ()
    """empty in the quick preset"""
    adjoint_distances: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0)
    """in units of the radius of the task's ball"""
    adjoint_points: int = 8
    """test points per token set and distance"""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    "quick": Theorem7Config(name="quick"),
    "full": Theorem7Config(
        name="full",
        L=(1, 2, 4, 8, 16, 32, 64),
        H=(4, 8, 16, 32, 64),
        inits=64,
        steps=200,
        probes=2,
        test_points=16,
        bias_L=(1, 2, 4, 8, 16, 32, 64, 128),
        bias_inits=512,
        reference_M=2**15,
        uniform_n=(4, 8, 16, 32, 64, 128, 256),
        uniform_L=8,
        uniform_H=8,
        uniform_inits=16,
        ascent_steps=40,
        ascent_restarts=3,
        global_LH=((4, 4), (8, 8), (16, 16)),
        global_inits=32,
        global_checkpoints=(0, 16, 32, 63, 125, 250, 500, 1000, 2000),
        global_fit_from=250,
        lemma6_d=(2, 4, 8, 16, 32, 64),
        lemma6_inits=16,
        lemma6_steps=200,
        lemma6_optimizers=("adamw", "blockwise_sum", "blockwise_mean"),
        lemma6_eps=(1e-8, 1e-5, 1e-3),
        lemma6_fit_min_d=16,
        trained_bias_L=(1, 2, 4, 8, 16, 32, 64),
        trained_bias_inits=1024,
        trained_bias_groups=16,
        trained_bias_more_H=(16,),
        trained_bias_more_L=(1, 2, 4, 8, 16, 32),
        adjoint_L=8,
        adjoint_H=(4, 8, 16, 32, 64),
        adjoint_distances=(0.0, 0.125, 0.25, 0.5, 1.0, 2.0),
        adjoint_points=16,
    ),
}
PRESETS["gpu"] = dataclasses.replace(
    PRESETS["full"],
    name="gpu",
    L=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    H=(4, 8, 16, 32, 64, 128, 256),
    bias_L=(1, 2, 4, 8, 16, 32, 64),
    reference_M=2**17,
    uniform_n=(4, 8, 16, 32, 64, 128, 256, 512, 1024),
    trained_bias_L=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    trained_bias_inits=512,
    adjoint_H=(4, 8, 16, 32, 64, 128, 256),
)
"""`quick`: about two minutes on 2 cores (the main job's default; part 4 to
`k = 1000` at `L = H = 4`, about 12 s; part 2 after training and parts 5 and
6 left out). `full`: the CPU preset (`L, H` to 64; 118 min of
conditions on 2 cores, some beside other studies: part 1 35 min, part 2 16
min at `k = 0` and 35 min after training, parts 3 to 6 about 8 min each;
in part 5 the first `eps` at each `(d, optimiser)` compiles, about 20 s, the
others take 1-3 s). `gpu`: `L, H` to 256 and `n` to 1024, for one GPU
(parts 4 and 5 as `full`)."""
