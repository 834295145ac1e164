"""`python -m core.train`: the training command (the code lives in core/training/train.py)."""

from core.training.train import main

if __name__ == "__main__":
    main()
