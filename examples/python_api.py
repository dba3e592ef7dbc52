"""The README's Python example: bring your own model, rows, callback and TrainingArguments (tests/test_api.py)."""
import sys

import sft
from sft.models import build_random
from transformers import TrainerCallback

out = sys.argv[1] if len(sys.argv) > 1 else "outputs/api"
rows = [{"question": f"What is {i} plus {i}?", "answer": f"{2 * i}."} for i in range(200)]
cfg = sft.load_config("demo", ["model.name=arch:tiny-llama", "model.dtype=fp32", "demo.generate=false",
                               "demo.accuracy_samples=0", "data.eval_path=null", "data.seq_length=64",
                               "training.max_steps=8", "training.learning_rate=5e-3", f"training.output_dir={out}"])


class PrintLoss(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kw):
        print(state.global_step, logs.get("loss"))


summary = sft.train(cfg, model=build_random("tiny-llama", seed=cfg.training.seed), dataset=rows,
                    callbacks=[PrintLoss()], training_args={"optim": "adamw_torch", "adam_beta2": 0.98})
print(f"loss {summary.loss_first:.3f} -> {summary.loss_last:.3f}; merged model in {summary.paths['merged']}")
print(sft.generate(summary.paths["merged"], ["What is 3 plus 3?"], max_new_tokens=4))
