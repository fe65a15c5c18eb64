"""The runtime: engines, and what runs them (video, tiling, pre/post-processing)."""
