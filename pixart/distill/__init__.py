"""DMD one-step distillation: a generator and a fake score trained beside the frozen teacher."""
