"""``python -m benchmarks.attention``: the name the project's standing AMX rule uses for the attention study,
which lives in :mod:`benchmarks.studies.attention`. Only this forwarding entry point stays here."""

from benchmarks.studies.attention import main

if __name__ == "__main__":
    main()
