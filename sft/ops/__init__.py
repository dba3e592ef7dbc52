"""Model-level compute ops: the chunked lm_head + cross-entropy, per-document (varlen) attention, and the registry
of which model types each supports (capabilities)."""
