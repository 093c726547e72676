"""Deprecated: the scaling study moved to `mfattn.studies.scaling` (the
study: presets, runs, plots, tables, command line) and its fits to the library
([`mfattn.slope_fit`][], [`mfattn.combined_fit`][]). This module re-exports
what it used to expose."""

import warnings

from mfattn import combined_fit as combined_fit
from mfattn import slope_fit as slope_fit
from mfattn.studies.scaling import PRESETS as PRESETS
from mfattn.studies.scaling import condition_name as condition_name
from mfattn.studies.scaling import main as main
from mfattn.studies.scaling import run as run
from mfattn.studies.scaling import summarize as summarize
from mfattn.studies.scaling import table as table

warnings.warn(
    "`mfattn.scaling` is deprecated: import the study from `mfattn.studies.scaling` "
    "and the fits from `mfattn` (`mfattn.slope_fit`, `mfattn.combined_fit`)",
    DeprecationWarning,
    stacklevel=2,
)
