"""The study's results as typed records, each serialised to the JSON layout of
the per-condition files (`<out>_points/<condition>.json`) and of the study
JSON's `points`."""

from typing import NamedTuple


class Split(NamedTuple):
    """An error over initialisations, split into bias and fluctuation
    (`mfattn.bias_fluctuation`; docs/theory.md, section 7).

    - `total_random`: per initialisation, the error at random `z` (max over
      recorded steps, probes, layers and test points).
    - `per_step_random`: the same per initialisation and recorded step.
    - `bias`, `bias_noise`: the error of the mean over initialisations, and its
      Monte-Carlo noise; `bias_loo`: the bias with each initialisation left out;
      `bias_per_step`: per recorded step.
    - `fluctuation`, `fluctuation_per_step`: per initialisation, its distance
      to that mean (over all steps, and per step).
    """

    total_random: list
    per_step_random: list
    bias: float
    bias_loo: list
    bias_noise: float
    bias_per_step: list
    fluctuation: list
    fluctuation_per_step: list

    def to_json(self) -> dict:
        return self._asdict()


class GridPoint(NamedTuple):
    """One grid point `(L, H)` of a condition: the state and adjoint together
    (the fields of `Split`, with the adversarial sup `total` and the recorded
    step `peak_step` where each initialisation's error peaks), each part alone
    (`state`, `adjoint`: random `z`), Lemma 6's distances (`lemma6`: per
    initialisation; `lemma6_per_step`: per initialisation and step;
    `lemma6_reference`: the limit's own, per step) and the discrete models'
    training loss (mean over initialisations, per step)."""

    L: int
    H: int
    total: list
    total_random: list
    per_step_random: list
    peak_step: list
    bias: float
    bias_loo: list
    bias_noise: float
    bias_per_step: list
    fluctuation: list
    fluctuation_per_step: list
    state: Split
    adjoint: Split
    lemma6: list
    lemma6_per_step: list
    lemma6_reference: list
    discrete_loss: list

    def to_json(self) -> dict:
        return dict(self._asdict(), state=self.state.to_json(), adjoint=self.adjoint.to_json())


class Reference(NamedTuple):
    """The limit's own error per recorded step (max over probes, test points
    and depths): `M` against `4M` particles and `J` against `2J` nodes, of the
    state and adjoint together, of the state alone (`_state`) and of the
    adjoint alone (`_adjoint`); `nodes` and `particles`: `J` and `M`."""

    M_vs_4M: list
    J_vs_2J: list
    M_vs_4M_state: list
    J_vs_2J_state: list
    M_vs_4M_adjoint: list
    J_vs_2J_adjoint: list
    nodes: int
    particles: int

    def to_json(self) -> dict:
        return self._asdict()


class ConditionResult(NamedTuple):
    """Everything one (task, optimiser) condition measured: its name and
    task, the recorded steps, the limit's own error (`reference`), its
    displacement `max_z |z_k(1) - z_0(1)|` per recorded step and training loss,
    the grid points (`"L<L>/H<H>"` to `GridPoint`), and the wall time."""

    condition: str
    dim: int
    tokens: int
    opt: str
    causal: bool
    steps: list
    reference: Reference
    displacement: list
    limit_loss: list
    points: dict
    wall_seconds: float

    def to_json(self) -> dict:
        out = self._asdict()
        out["reference"] = self.reference.to_json()
        out["points"] = {k: p.to_json() for k, p in self.points.items()}
        out["status"] = "done"
        return out


class FailedCondition(NamedTuple):
    """A condition that raised: the error and its traceback (recorded, and
    skipped on resume unless failed conditions are retried)."""

    error: str
    traceback: str

    def to_json(self) -> dict:
        return {"status": "failed", "error": self.error, "traceback": self.traceback}
