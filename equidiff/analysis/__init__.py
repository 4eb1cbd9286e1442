"""Analyses of classifiers under diffusion noise and of their energies (seed 002, sections 4.4, 4.6, 4.8).

* ``NoiseAnalysis`` (``equidiff test``): accuracy, E(x), E(x, y) against the forward-diffusion timestep,
  on noised x_t (Figs. 4.5, 4.9) or darkened sqrt(alpha_bar_t) x_0 (Fig. 4.6).
* ``ClassEnergyStats`` (``equidiff predict`` over the training split): class-wise E(x) statistics
  (Fig. 4.12), cached for the dual objective and read back with ``load_class_energy_means``.

Every statistic is a sum-reduced ``GridMoments`` state, so results are exact under DDP; each analysis
writes a CSV and a PNG into the output folder and sends them to the loggers.
"""

from equidiff.analysis.energy_stats import ClassEnergyStats, load_class_energy_means, write_class_energy_stats
from equidiff.analysis.noise import NoiseAnalysis, check_timesteps, darkened, noised
from equidiff.analysis.plots import Series, plot_class_stats, plot_curves
from equidiff.analysis.stats import GridMoments, grid_moments

__all__ = [
    "ClassEnergyStats",
    "GridMoments",
    "NoiseAnalysis",
    "Series",
    "check_timesteps",
    "darkened",
    "grid_moments",
    "load_class_energy_means",
    "noised",
    "plot_class_stats",
    "plot_curves",
    "write_class_energy_stats",
]
