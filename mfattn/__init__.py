"""mfattn: the mean-field theory of deep attention-only transformers, computable.

Tokens are particles, the heads of a layer are a measure over parameters, depth
is time. The mathematics, formula by formula, with the function that computes
each, is in `docs/theory.md`.
"""

import importlib.metadata

from ._adjoint import AbstractLimitAdjoint as AbstractLimitAdjoint
from ._adjoint import ClosedFormAdjoint as ClosedFormAdjoint
from ._adjoint import DiffraxAdjoint as DiffraxAdjoint
from ._adversarial import AdversarialSup as AdversarialSup
from ._adversarial import adversarial_sup as adversarial_sup
from ._adversarial import central_difference as central_difference
from ._attention_weights import attention_weights as attention_weights
from ._checkpoint import CheckpointError as CheckpointError
from ._checkpoint import list_checkpoints as list_checkpoints
from ._checkpoint import load_checkpoint as load_checkpoint
from ._checkpoint import load_latest as load_latest
from ._checkpoint import save_checkpoint as save_checkpoint
from ._checks import check_finite as check_finite
from ._checks import checks_enabled as checks_enabled
from ._checks import set_checks as set_checks
from ._coercivity import Coercivity as Coercivity
from ._coercivity import coercivity as coercivity
from ._convergence import BiasFluctuation as BiasFluctuation
from ._convergence import antithetic_mean_field as antithetic_mean_field
from ._convergence import bias_fluctuation as bias_fluctuation
from ._convergence import flow_error as flow_error
from ._coupling import CoupledTrainResult as CoupledTrainResult
from ._coupling import train_coupled as train_coupled
from ._data import DenoisingTask as DenoisingTask
from ._discrete import discrete_loss as discrete_loss
from ._discrete import solve_discrete as solve_discrete
from ._distributed import barrier as barrier
from ._distributed import batch_mesh as batch_mesh
from ._distributed import gather as gather
from ._distributed import is_main_process as is_main_process
from ._distributed import process_share as process_share
from ._distributed import replicate as replicate
from ._distributed import shard_batch as shard_batch
from ._field import AttentionField as AttentionField
from ._fits import combined_fit as combined_fit
from ._fits import jackknife as jackknife
from ._fits import power_law_fit as power_law_fit
from ._fits import slope_fit as slope_fit
from ._fits import t_interval as t_interval
from ._geometry import AbstractGeometry as AbstractGeometry
from ._geometry import Euclidean as Euclidean
from ._geometry import Sphere as Sphere
from ._gradient_flow import GradientFlowField as GradientFlowField
from ._gradient_flow import GradientFlowSolution as GradientFlowSolution
from ._gradient_flow import gradient_flow as gradient_flow
from ._interpolation import AbstractInterpolation as AbstractInterpolation
from ._interpolation import PiecewiseConstant as PiecewiseConstant
from ._interpolation import PiecewiseLinear as PiecewiseLinear
from ._kernels import AbstractAttentionKernel as AbstractAttentionKernel
from ._kernels import AbstractForwardOnlyKernel as AbstractForwardOnlyKernel
from ._kernels import AutoKernel as AutoKernel
from ._kernels import ChunkedKernel as ChunkedKernel
from ._kernels import DenseKernel as DenseKernel
from ._kernels import FusedBuildError as FusedBuildError
from ._kernels import FusedCPUKernel as FusedCPUKernel
from ._kernels import PallasKernel as PallasKernel
from ._kernels import ShardedKernel as ShardedKernel
from ._kernels import UnnormalizedKernel as UnnormalizedKernel
from ._kernels import fused_cpu_available as fused_cpu_available
from ._limit import limit_gradient as limit_gradient
from ._limit import solve_limit as solve_limit
from ._loss import AbstractLoss as AbstractLoss
from ._loss import DenoisingLoss as DenoisingLoss
from ._loss import MMDLoss as MMDLoss
from ._loss import check_loss as check_loss
from ._measure import EmpiricalMeasure as EmpiricalMeasure
from ._mlp import MLPParams as MLPParams
from ._mlp import mlp_backward as mlp_backward
from ._mlp import mlp_forward as mlp_forward
from ._model import AbstractModel as AbstractModel
from ._model import DiscreteTransformer as DiscreteTransformer
from ._model import MeanFieldTransformer as MeanFieldTransformer
from ._ntk import AbstractTokenLaw as AbstractTokenLaw
from ._ntk import GaussianMixtureLaw as GaussianMixtureLaw
from ._ntk import UniformBoxLaw as UniformBoxLaw
from ._ntk import lse_independence as lse_independence
from ._ntk import mean_field_inner as mean_field_inner
from ._ntk import node_weights as node_weights
from ._ntk import output_gradient_maps as output_gradient_maps
from ._ntk import tangent_kernel as tangent_kernel
from ._optim import ScaleByBlockwiseAdamState as ScaleByBlockwiseAdamState
from ._optim import blockwise_adamw as blockwise_adamw
from ._optim import scale_by_blockwise_adam as scale_by_blockwise_adam
from ._params import AttentionParams as AttentionParams
from ._path import ParamPath as ParamPath
from ._pathwise import AbstractMultipliers as AbstractMultipliers
from ._pathwise import CoupledPaths as CoupledPaths
from ._pathwise import GaussianMultipliers as GaussianMultipliers
from ._pathwise import RademacherMultipliers as RademacherMultipliers
from ._pathwise import pathwise_coupling as pathwise_coupling
from ._probe import ProbeSolution as ProbeSolution
from ._probe import probe_gradient as probe_gradient
from ._probe import probe_outputs as probe_outputs
from ._residual import AbstractResidualScaling as AbstractResidualScaling
from ._residual import InverseDepth as InverseDepth
from ._residual import InverseSqrtDepth as InverseSqrtDepth
from ._risk import AbstractRisk as AbstractRisk
from ._risk import EmpiricalRisk as EmpiricalRisk
from ._risk import ProbeRisk as ProbeRisk
from ._sde import SDESolution as SDESolution
from ._sde import noise_covariance as noise_covariance
from ._sde import solve_sde as solve_sde
from ._solution import Solution as Solution
from ._train import DivergenceError as DivergenceError
from ._train import TrainResult as TrainResult
from ._train import TrainState as TrainState
from ._train import batch_solve as batch_solve
from ._train import evaluate as evaluate
from ._train import save_results as save_results
from ._train import train as train
from ._vector_field import AdjointVectorField as AdjointVectorField
from ._vector_field import AttentionVectorField as AttentionVectorField
from ._vector_field import MeanFieldVectorField as MeanFieldVectorField

# isort: split
# Clusters, the equiangular reduction, the circle's linear stability, the token flow
# on the sphere and hardmax attention
from ._circle import circle_fourier_modes as circle_fourier_modes
from ._circle import circle_growth_rates as circle_growth_rates
from ._circle import predicted_cluster_count as predicted_cluster_count
from ._clusters import Plateau as Plateau
from ._clusters import cluster_labels as cluster_labels
from ._clusters import count_clusters as count_clusters
from ._clusters import diameter as diameter
from ._clusters import metastable_plateaus as metastable_plateaus
from ._clusters import pairwise_distances as pairwise_distances
from ._clusters import time_to_one_cluster as time_to_one_cluster
from ._equiangular import equiangular_points as equiangular_points
from ._equiangular import equiangular_rho as equiangular_rho
from ._equiangular import equiangular_velocity as equiangular_velocity
from ._flow import TokenFlowField as TokenFlowField
from ._flow import attention_flow as attention_flow
from ._flow import identity_layer as identity_layer
from ._hardmax import HardmaxKernel as HardmaxKernel
from ._sphere import project_tangent as project_tangent

try:
    __version__ = importlib.metadata.version("mfattn")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover
    __version__ = "0.0.0"
