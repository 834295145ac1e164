"""`python -m core.evaluate`: the evaluation command (the code lives in core/training/evaluate.py)."""

from core.training.evaluate import main

if __name__ == "__main__":
    main()
