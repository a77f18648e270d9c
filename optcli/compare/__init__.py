"""`optcli compare`: the article's two tables measured on the user's model and machine: quantization
methods (run.py, table.py) and serving optimizations (optimizations.py), and the artifact to ship.

Imports flow: cli -> compare -> bench / quantize -> engine -> ... (compare aggregates profile reports
through access.py only)."""
