"""One-off studies: each measured one part of sft (or a choice among candidates) once, its result recorded where it
is used (README, benchmarks/results/, a module's docstring). They may reach into sft's internals; the `sft bench`
tool does not. Each runs as ``python -m benchmarks.studies.NAME``:

``allreduce_backends``  gloo vs DeepSpeed oneCCL vs DeepSpeed shared memory, all-reduce latency / bandwidth.
``attention``           packed-block attention candidates (mask, sft_varlen fp32 / bf16, GEMM backward).
``checkpoint_ab``       selective activation checkpointing: step time with all, K or no layers recomputed.
``costmodel_check``     the cost model against measured 2-node steps (a table and a plot from the test's report).
``demo_tuning``         how the demo's settings were chosen (plain peft + a torch loop; results in the file).
``dropout``             sft's CPU LoRA dropout mask against F.dropout.
``merge_memory``        peak memory of sft.merging.merge_adapter against the base's size on disk.
``projection``          the cost model's projection for the configurations users ask about.
``stream_rate``         streaming rate of training data: Deep Lake on S3 (moto on loopback) against a local path.
"""
