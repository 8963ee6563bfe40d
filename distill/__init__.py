"""Teacher targets, the student family, knowledge-distillation losses and Lightning training."""
