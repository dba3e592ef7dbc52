"""Benchmarks for sft: the `sft bench` tool (a matrix runner, the seed-recipe baseline, scaling studies) and, in
``benchmarks.studies``, one-off studies.

The tool trains through the public API (``sft.train``); a study may reach into sft's internals to measure one part.

Modules, in the order a run uses them:

``matrix``     YAML matrix -> cells (model x quantization x seq length x micro-batch x checkpointing x dtype x
               variant x ranks); variants are RunConfig overrides.
``data``       the synthetic Deep Lake dataset every cell reads (generated once, cached).
``machine``    machine facts (CPU, flags, GPU, library versions, git commit) and spec peak FLOP/s.
``runner``     runs each cell in its own subprocess (or set of rank processes), aggregates per-rank results,
               appends them to ``benchmarks/results/<date>-<host>.jsonl``.
``cell``       the subprocess side: builds the run through ``sft.recipe.train`` (variant ``framework``) or
               ``benchmarks.baseline`` (variant ``baseline``) with instrumentation on the same Trainer.
``baseline``   the seed recipe (Trainer + PEFT, bf16 weights with fp32 1-D params under autocast, naive packing).
``report``     Markdown table (printed with rich, saved as .md) and PNG plots.
``costmodel``  compute time + ring all-reduce of LoRA gradients -> scaling efficiency projections.
``scaling``    `sft bench scaling`: measured strong / weak scaling over ranks, checked against the cost model.
``session``    what every command shares: the options, the console, the run header (machine facts, peak).
``cli``        `sft bench ...` argument parsing.
``allreduce``  the all-reduce micro-benchmark the scaling study fits the cost model with.
``slurm_scaling``  `sft bench scaling --slurm`: the scaling study through sbatch.
``gpu_check``, ``gpu_carry``  the GPU check (benchmarks/gpu_check.sh) and what travels to its machine.
"""
