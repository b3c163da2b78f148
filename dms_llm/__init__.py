"""dms-llm: Differentiable Model Scaling for Hugging Face Llama-family LLMs.

The whole job in one call (what ``dms-llm prune`` runs):

    run = prune_checkpoint(PruneJob("smollm2-135m", "smollm2-dms", PruneConfig(keep=0.8)))

or step by step:

    model, tokenizer, _ = load_model("smollm2-135m")
    calib = calibration_windows(tokenizer, "pydoc", seq_len=256, num_samples=64)
    held_out = held_out_windows(tokenizer, "pydoc", 256, 64, count=4, length=2048)  # text calib does not hold
    result = prune(model, calib, PruneConfig(keep=0.8), held_out=held_out, repair=ReconstructConfig())
    # the search, then its best candidates repaired and scored on held_out: the command's choice; model unchanged
    exported = export(model, result.structure, "smollm2-dms", tokenizer=tokenizer, pruned=result.repaired)
    print(evaluate(exported.model, tokenizer, ppl_data=["pydoc-heldout"]))
    finetune(exported.model, calib, FinetuneConfig(tokens=200_000), teacher=model)   # recovery by distillation
    save_recovered(exported.model, "smollm2-dms-ft", "smollm2-dms", tokenizer=tokenizer)
    push("smollm2-dms-ft", "me/smollm2-dms")
"""

__version__ = "0.1.0"

from .data import calibration_windows, held_out_windows, load_text
from .errors import DMSError
from .evaluation import evaluate, perplexity
from .exporter import build_pruned_model, export
from .folder import save_recovered
from .gates import DMSGates, hard_masked
from .hub import push, stage
from .loading import load_model
from .pipeline import EvalJob, FinetuneJob, PruneJob, evaluate_checkpoint, finetune_checkpoint, prune_checkpoint
from .reconstruct import ReconstructConfig  # the function stays dms_llm.reconstruct.reconstruct: no module shadowing
from .recovery import FinetuneConfig, FinetuneResult, finetune
from .resources import ResourceModel, count_parameters
from .search import PruneConfig, PruneResult, prune
from .structure import ModelShape, Structure
from .topk import DifferentiableTopK

__all__ = [
    "DMSError", "DMSGates", "DifferentiableTopK", "EvalJob", "FinetuneConfig", "FinetuneJob", "FinetuneResult",
    "ModelShape", "PruneConfig", "PruneJob", "PruneResult", "ReconstructConfig", "ResourceModel", "Structure",
    "build_pruned_model", "calibration_windows", "count_parameters", "evaluate", "evaluate_checkpoint", "export",
    "finetune", "finetune_checkpoint", "hard_masked", "held_out_windows", "load_model", "load_text", "perplexity",
    "prune", "prune_checkpoint", "push", "save_recovered", "stage",
]
