"""The shared kernel every stage builds on; it imports nothing else in `tasks`.

Unlike the stage packages, core's public surface is its modules, each with one job, imported by
module path (`from tasks.core.recipe import DistillConfig`) so a reader sees where a name lives:

- `common`: ModelRef, StageContext, StageResult, paths, atomic JSON, progress lines
- `model_folder`: a model folder's fingerprint, sealed inside it when it is finished
- `model_store`: resolve a model spec offline (built-in GGUF, folder, HF cache), load and save
- `gptq_checkpoint`: THE quantized format: pack/unpack, read, dequantize, load, write
- `recipe`: the recipe schema and its one-line errors
- `conventions`: each model family's input conventions (BOS, chat text, soft-capping, windows)
- `data`: training and calibration text (never evaluation splits)
- `resources`: where a stage runs (processes, devices) and whether this machine can host it
- `peak_memory`: the process's resident high-water mark
- `lazy`: package faces that import on first use (keeps `pkdq --help` free of torch)
"""

__all__ = ["common", "conventions", "data", "gptq_checkpoint", "lazy", "model_folder",
           "model_store", "peak_memory", "recipe", "resources"]
