"""Layer 7, analysis of finished runs: the paper-style report (statistics, claims, plots,
rendering) and the toy feature extractors for Frechet distances."""
