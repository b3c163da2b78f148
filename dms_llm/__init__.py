"""dms-llm: Differentiable Model Scaling for Hugging Face Llama-family LLMs.

    model, tokenizer, _ = load_model("smollm2-135m")
    calib = calibration_windows(tokenizer, "wikitext2", seq_len=256, num_samples=64)
    result = prune(model, calib, PruneConfig(keep=0.8))
    exported = export(model, result.structure, "smollm2-dms", tokenizer=tokenizer)
    print(evaluate(exported.model, tokenizer, ppl_data=["wikitext2"]))
    finetune(exported.model, calib, FinetuneConfig(tokens=200_000), teacher=model)   # recovery by distillation
    save_recovered(exported.model, "smollm2-dms-ft", "smollm2-dms", tokenizer=tokenizer)
    push("smollm2-dms-ft", "me/smollm2-dms")
"""

__version__ = "0.1.0"

from .data import calibration_windows, load_text
from .evaluation import evaluate, perplexity
from .exporter import build_pruned_model, export
from .recovery import FinetuneConfig, FinetuneResult, finetune, save_recovered
from .hub import push, stage
from .gates import DMSGates, hard_masked
from .loading import load_model
from .resources import ResourceModel, count_parameters
from .search import PruneConfig, PruneResult, prune
from .structure import ModelShape, Structure
from .topk import DifferentiableTopK

__all__ = [
    "DMSGates", "DifferentiableTopK", "FinetuneConfig", "FinetuneResult", "ModelShape", "PruneConfig", "PruneResult", "ResourceModel", "Structure",
    "build_pruned_model", "calibration_windows", "count_parameters", "evaluate", "export", "hard_masked",
    "finetune", "load_model", "load_text", "perplexity", "prune", "push", "save_recovered", "stage",
]
