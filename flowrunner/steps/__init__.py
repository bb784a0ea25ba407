"""One module per family of step kinds; the engine dispatches on the step's model class."""
