"""Weight quantization (GPTQ, AWQ, RTN through GPTQModel) and GGUF export (see README.md)."""

from tasks.core.lazy import lazy_exports

_EXPORTS = {
    "quantize_stage": "stage",  # the stage: (ModelRef, QuantizeConfig, StageContext)
    "export_gguf": "gguf_export",  # Llama/Mistral/Qwen2/Qwen3/Gemma 3, float or GPTQ, to GGUF
    "GgufExportError": "gguf_export",
    "check_qtype": "gguf_export",  # refuses a qtype before the model is touched
    "GgufVerifyError": "gguf_verify",
    # a model's GGUF export timed in llama.cpp: the run's speed unit and the bench table
    "gguf_speed_rows": "gguf_speed",
    "gguf_speed_row": "gguf_speed",
    # GGUF files timed together in interleaved rounds: the speed goal's unit and bench
    "interleaved_speed": "speed_rounds",
    "time_side_by_side": "speed_rounds",
    "export_model": "export",  # `pkdq export`: a run/model folder in a served format, verified
    "check_export": "export",  # torch-free refusals (format, folders, architecture)
    "plan_imatrix": "export",  # torch-free: gguf-q4_k_m's importance-matrix text, or why none
    "ExportError": "errors",
    "EXPORT_FORMATS": "export",
    "exact_grid_problem": "gguf_grid",  # torch-free: can a GGUF type hold this GPTQ grid?
    # torch-free layout rules, shared with the recipe checks before a run
    "MARLIN_K_MULTIPLE": "shapes",
    "MARLIN_SOURCE": "shapes",
    "group_size_hint": "shapes",
    "marlin_k_note": "shapes",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
