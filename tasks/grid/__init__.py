"""The paper's experiment grid: configurations (what runs), tables (what the report shows), the
runs' results and data, and their placement on a Ray cluster. Empty on purpose: importing one module
must not import the others (a run's key hashes only the code it executes)."""
