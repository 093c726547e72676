"""Plots of a training run, drawn without touching matplotlib's backend."""

import pathlib

import numpy as np


def plot_training(history: dict, path, *, dpi: int = 120) -> pathlib.Path:
    """Draw the training loss (log scale) and the largest block norm per step
    side by side and save them to `path`.

    The figure is a `matplotlib.figure.Figure` on its own Agg canvas: it needs
    no backend and neither sets nor reads the process's (`matplotlib.use` is
    never called), so it works headless and leaves a notebook's plots alone.
    matplotlib is imported only here.

    **Arguments:**

    - `history`: a dict with per-step `loss` and `max_block_norm`, as in
      [`mfattn.TrainResult`][].
    - `path`: the image file to write (its suffix picks the format).
    - `dpi`: the resolution.

    **Returns:** `path`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = pathlib.Path(path)
    fig = Figure(figsize=(9, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots(1, 2)
    ax[0].plot(np.asarray(history["loss"]))
    ax[0].set(xlabel="step", ylabel="training loss (batch mean)", yscale="log")
    ax[1].plot(np.asarray(history["max_block_norm"]))
    ax[1].set(xlabel="step", ylabel="largest block norm")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path
