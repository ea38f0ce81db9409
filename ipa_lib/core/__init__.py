"""Layer 1, the method: typed config (`config`), the objectives as pure tensor functions
(`objective`), image metrics (`image_metrics`), the metric registry (`metrics`), typed stage
results (`results`), pure decisions (`decisions`: promotion rule, best-of-sweep), the one
exception base and exit-code policy (`errors`), atomic file writes (`io`). Imports nothing
else of ipa_lib."""
