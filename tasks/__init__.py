"""Stage logic: plain functions that do each stage's work (usable without Prefect), the shared
training engine, and the helpers every stage uses (config, run directory, tracking)."""
