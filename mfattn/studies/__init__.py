"""Studies built on mfattn's public API (presets, orchestration, plots, tables,
command lines). The library (`import mfattn`) does not import them."""
